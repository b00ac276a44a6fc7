"""Why train.py's XLA collectives take another route on XLA:CPU with several devices (backends.xla_reduce).

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python scripts/xla_cpu_collectives.py all_reduce   # aborts after ~15 s
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python scripts/xla_cpu_collectives.py all_gather   # works
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python scripts/xla_cpu_collectives.py late         # aborts: 25 s apart

Needs torch_xla (scripts/test_xla.sh builds a virtualenv with torch 2.9.0 + torch_xla 2.9.0). Verified there.
torch_xla.launch runs one thread per CPU device in one process; each replica sums [r + 1] * 4 over replicas
(expected: 3.0 with two replicas), twice.

- all_reduce: xm.all_reduce, as xm.optimizer_step / broadcast_master_param / rendezvous / mesh_reduce use it.
  Each replica compiles its own executable (the graph hash includes the device). XLA:CPU pairs the replicas of
  a collective by RendezvousKey(run_id, devices, kind, op_id), where op_id is the channel id or, without one,
  the compiled HLO module's unique id (xla/backends/cpu: GetCollectiveOpParams). torch_xla's all-reduce sets
  no channel id (torch_xla/csrc/cross_replica_reduces.cpp, BuildAllReduce: channel_id=nullopt), so the two
  replicas wait under op_id=0 and op_id=1; XLA logs "waiting for ... op_id=1 ... may be stuck" after 5 s and
  exits the process after 10 more ("Termination timeout ... exceeded"): collective operations hang when
  PJRT_DEVICE=CPU and CPU_NUM_DEVICES > 1, a known open limitation of torch_xla.
- all_gather: xm.all_gather with an explicit channel_id (and use_global_device_ids, which channel ids require)
  makes op_id the channel id on both replicas: they meet. The sum is taken over the gathered rows.
- late: the same all_gather, replica 1 arriving 25 s after replica 0: XLA:CPU's in-process collectives give up
  after 5 + 10 s whatever the program does, so replicas must reach each collective together (train.py: a
  threading.Barrier before a collective that runs as a tiny graph of its own).
"""
import sys
import time

import torch


def replica(index, mode):
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr
    rank, world = xr.global_ordinal(), xr.world_size()
    value = torch.full((4,), rank + 1.0, device=torch_xla.device())
    for attempt in range(2):
        if mode == "late" and rank == 1 and attempt == 1:
            time.sleep(25)
        if mode == "all_reduce":
            total = xm.all_reduce(xm.REDUCE_SUM, value)
        else:
            every = xm.all_gather(value[None], dim=0, groups=[list(range(world))], pin_layout=False, channel_id=1,
                                  use_global_device_ids=True)  # (world, 4)
            total = every.sum(0)
        torch_xla.sync()
        print(f"replica {rank}, attempt {attempt}: {total.cpu().tolist()} (expected [3.0] * 4)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("all_reduce", "all_gather", "late"):
        sys.exit("usage: PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python scripts/xla_cpu_collectives.py "
                 "all_reduce|all_gather|late")
    import torch_xla
    torch_xla.launch(replica, args=(sys.argv[1],))
