# packaging/prometheus: the scrape configuration and the alerting rules are
# valid, and promtool's rule unit tests (alerts_test.yml: a full queue, a
# queue without consumers, ...) pass. They need promtool only.
find_program(PROMTOOL promtool REQUIRED)
set(PROM_DIR ${PROJECT_SOURCE_DIR}/packaging/prometheus)
add_test(NAME unit.prometheus_rules
  COMMAND ${PROMTOOL} check rules ${PROM_DIR}/alerts.yml)
add_test(NAME unit.prometheus_rules_test
  COMMAND ${PROMTOOL} test rules alerts_test.yml
  WORKING_DIRECTORY ${PROM_DIR})
add_test(NAME unit.prometheus_config
  COMMAND ${PROMTOOL} check config ${PROM_DIR}/prometheus.yml)
set_tests_properties(unit.prometheus_rules unit.prometheus_rules_test
  unit.prometheus_config PROPERTIES LABELS unit TIMEOUT 60)
