# Latency against offered load (open loop), from scripts/bench.sh's sweep:
#   gnuplot -e "dir='build-bench'; impls='mqrpc \"mqrpc (ours)\" bare \"...\"'" \
#       bench/plot_load.gp
# impls: pairs of NAME "TITLE"; NAME's data is DIR/load-NAME.dat (written by
# bench/load_data.py: offered/s, achieved/s, p50, p90, p99, p99.9, max in ms,
# errors). One colour per implementation: p99 solid, p50 dashed. Writes
# DIR/load.svg and DIR/load.png (terminals svg and pngcairo, both in
# Debian's gnuplot-nox).
if (!exists("dir")) dir = "build-bench"
if (!exists("impls")) impls = 'mqrpc "mqrpc (ours)" bare "bare rabbitmq-c (floor)"'
n = words(impls) / 2
file(i) = sprintf("%s/load-%s.dat", dir, word(impls, 2 * i - 1))
title(i) = word(impls, 2 * i)

set title "soma call latency against offered load (open loop, 1 connection, service prefetch 64)"
set xlabel "offered load (calls/s)"
set ylabel "latency from the scheduled start (ms, log scale)"
set logscale y
set format y "%g"
set grid xtics ytics mytics
set key below horizontal
set xrange [0:*]
set style line 1 lc rgb "#1f77b4" lw 2 pt 7 ps 0.6
set style line 2 lc rgb "#d62728" lw 2 pt 7 ps 0.6
set style line 3 lc rgb "#2ca02c" lw 2 pt 7 ps 0.6
set style line 4 lc rgb "#9467bd" lw 2 pt 7 ps 0.6

set terminal svg size 900,500 dynamic font "sans,11"
set output dir . "/load.svg"
plot for [i=1:n] file(i) using 1:5 with linespoints ls i title title(i) . " p99", \
     for [i=1:n] file(i) using 1:3 with linespoints ls i dt 2 title title(i) . " p50"

set terminal pngcairo size 900,500 font "sans,10"
set output dir . "/load.png"
replot
set output
