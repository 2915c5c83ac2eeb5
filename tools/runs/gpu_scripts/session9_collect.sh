# Wait for both runs, then bring back their records, logs and checkpoints.
W=${1:-400}
for i in $(seq 1 $W); do
  [ -f /root/runs/lora5a/record.json ] && [ -f /root/runs/lora5b/record.json ] && grep -q '"done"' /root/runs/lora5a/record.json && grep -q '"done"' /root/runs/lora5b/record.json && break
  sleep 1
done
tail -4 /root/runs/lora5a.log /root/runs/lora5b.log
for n in lora5a lora5b; do mkdir -p $OUT/$n && cp /root/runs/$n.log $OUT/$n/train.log; cp /root/runs/$n/* $OUT/$n/ 2>/dev/null; done
python3 - <<'P'
import json
for n in ("lora5a", "lora5b"):
    try:
        r = json.load(open(f"/root/runs/{n}/record.json"))
        print(n, r.get("status"), r.get("steps_done"), r.get("val_accuracy"), {k: v["acc"] for k, v in r.get("val_by_type", {}).items()})
    except Exception as e:
        print(n, "no record", e)
P
ls -la $OUT/*
