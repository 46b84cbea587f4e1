"""The `punica` command: `punica serve ...` (OpenAI-compatible server), `punica cluster ...` (the
same server over engines on Ray), `punica simulate ...` and `punica bench ...`."""

from __future__ import annotations

import argparse
import sys

BENCHES = {
    "adapter-latency": "punica.bench.adapter_latency",
    "adapters": "punica.bench.adapters",
    "fairness": "punica.bench.fairness",
    "decode": "punica.bench.decode",
    "lora-op": "punica.bench.lora_op",
    "lora-slices": "punica.bench.lora_slices",
    "textgen": "punica.bench.textgen",
    "serve": "punica.bench.serve",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:  # all its flags are its own (argparse's REMAINDER needs a
        from punica.cluster.report import main as simulate  # positional before it)

        return simulate(argv[1:])
    ap = argparse.ArgumentParser(prog="punica", description="Punica: many LoRA adapters of one "
                                 "base model, served from shared GPUs.")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    from punica.server.serve import add_serve_args

    add_serve_args(serve)
    cluster = sub.add_parser("cluster", help="serve the OpenAI API from several engines on Ray "
                             "(Punica's consolidating scheduler, migration)")
    from punica.cluster.deploy import add_cluster_args

    add_serve_args(cluster)
    add_cluster_args(cluster)
    sim = sub.add_parser("simulate", help="replay a trace over simulated GPUs per policy")
    sim.add_argument("args", nargs=argparse.REMAINDER, help="its flags (simulate --help)")
    bench = sub.add_parser("bench", help="run a benchmark (writes JSON to benchmarks/results)")
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its own flags (see NAME --help)")
    ns = ap.parse_args(argv)
    if ns.command in ("serve", "cluster"):
        from punica.errors import PunicaError

        try:
            if ns.command == "serve":
                from punica.server.serve import serve as run_server

                return run_server(ns)
            from punica.cluster.deploy import run_cluster

            return run_cluster(ns)
        except (PunicaError, ValueError, OSError) as err:  # bad flags or files: one line
            import logging

            logging.getLogger("punica").debug("start failed", exc_info=err)
            print(f"punica {ns.command}: error: {err}", file=sys.stderr)
            return 2
    if ns.command == "bench":
        import importlib

        return importlib.import_module(BENCHES[ns.name]).main(ns.args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
