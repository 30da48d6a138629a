"""Stand-in GRPO driver (tests/slurm): records how slurm/grpo_lopti.sh called it."""

import json
import os
import sys

if __name__ == "__main__":
    out = os.environ["STUB_RAY_DIR"]
    with open(os.path.join(out, "driver.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "node": os.environ.get("SLURMD_NODENAME"),
                   "ray_address": os.environ.get("RAY_ADDRESS"), "pythonpath": os.environ.get("PYTHONPATH"),
                   "nodes_seen": sorted(n for n in os.listdir(out) if n.startswith("node_"))}, f)
    print("stub driver ran", flush=True)
