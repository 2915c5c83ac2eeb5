set -x
cp .carry/g2/gpart01 ~/lmcache/ && ls -la ~/lmcache
