# Waits up to $2 s for the background job $1 (build, suite, agree) to write its "rc=" line; shows its log's tail.
for i in $(seq 1 ${2:-300}); do grep -q "$1_bg rc" ~/$1.log 2>/dev/null && break; sleep 1; done
tail -n ${3:-15} ~/$1.log
