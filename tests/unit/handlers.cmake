# Unit tests of the service handlers; included by tests/unit/CMakeLists.txt
# after it has defined PkgConfig::CMOCKA. One executable, one CTest entry per
# service (the argument selects the group), so a failure names its service.

add_executable(test_handlers ${CMAKE_CURRENT_LIST_DIR}/test_handlers.c)
target_link_libraries(test_handlers PRIVATE
  svc_soma svc_media svc_info svc_busca mqrpc::mqrpc PkgConfig::CMOCKA)
target_compile_definitions(test_handlers PRIVATE
  BUSCA_DATA_FILE="${PROJECT_SOURCE_DIR}/services/busca/pessoas.json")

foreach(svc soma media info busca)
  add_test(NAME unit.${svc} COMMAND test_handlers ${svc})
  set_tests_properties(unit.${svc} PROPERTIES LABELS unit TIMEOUT 60)
endforeach()
