"""The `pagedbackend` command.

    pagedbackend tiny-model --arch llama --out models/demo-llama
    pagedbackend generate --model models/demo-llama --prompt "Once upon a time" --max-tokens 64
    pagedbackend archive --model models/demo-llama --name demo --export-path model_store
    pagedbackend serve torchserve --model models/demo-llama
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from pagedbackend.config import EngineArgs


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """A flag per EngineArgs field, generated from its declaration (pagedbackend/config.py)."""
    EngineArgs.add_cli_args(p)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs.from_cli_args(ns)


def cmd_tiny_model(ns: argparse.Namespace) -> int:
    from pagedbackend.tiny_model import build_tiny_model

    rope = json.loads(ns.rope_scaling) if ns.rope_scaling else None
    path = build_tiny_model(
        ns.out, ns.arch, hidden_size=ns.hidden_size, num_layers=ns.num_layers, num_heads=ns.num_heads,
        num_kv_heads=ns.num_kv_heads, intermediate_size=ns.intermediate_size, vocab_size=ns.vocab_size,
        max_position_embeddings=ns.max_position_embeddings, sliding_window=ns.sliding_window,
        rope_scaling=rope, init_std=ns.init_std, seed=ns.seed, max_shard_size=ns.max_shard_size,
        tie_word_embeddings=ns.tie_word_embeddings,
    )
    print(f"wrote a random-weight {ns.arch} model to {path}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from pagedbackend.llm_engine import LLMEngine
    from pagedbackend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sample_seed, stop=ns.stop or None, ignore_eos=ns.ignore_eos)
    engine = LLMEngine.from_engine_args(engine_args_from(ns))
    engine.add_request("cli", ns.prompt, params)
    out = sys.stdout
    out.write(ns.prompt)
    out.flush()
    start = time.perf_counter()
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.write(o.outputs[0].delta_text)
            out.flush()
            final = o
    elapsed = time.perf_counter() - start
    if final is not None:
        c = final.outputs[0]
        out.write(f"\n\n[{len(c.token_ids)} tokens in {elapsed:.2f}s, finish_reason={c.finish_reason}]\n")
    return 0


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="split the model over N ranks (writes handler.tensor_parallel_size and how TorchServe "
                        "runs the ranks; default: as the config says)")
    p.add_argument("--parallel-type", choices=("custom", "tp"), default="custom",
                   help="custom: one worker whose engine starts its ranks (parallelLevel: N); tp: TorchServe "
                        "starts them with torchrun (torchrun: {nproc-per-node: N})")


def cmd_archive(ns: argparse.Namespace) -> int:
    from pagedbackend.adapters.torchserve.launcher import build_archive

    path = build_archive(ns.model, ns.name, ns.export_path, ns.config, ns.no_archive, ns.version,
                         ns.model if ns.point_to_model else None, ns.tensor_parallel_size, ns.parallel_type)
    print(f"wrote {path}")
    return 0


def cmd_serve_torchserve(ns: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive

    created = ns.workdir is None  # a temp dir of ours: removed on stop, logs included
    workdir = Path(ns.workdir or tempfile.mkdtemp(prefix="pagedbackend-torchserve-"))
    server = None

    def start():
        nonlocal server
        store = workdir / "model_store"
        name = ns.name or Path(ns.model).resolve().name
        # The archive points at the model directory instead of copying it.
        archive = build_archive(ns.model, name, store, ns.config, model_path=ns.model,
                                tensor_parallel_size=ns.tensor_parallel_size, parallel_type=ns.parallel_type)
        server = TorchServe(store, {name: archive.name}, workdir, host=ns.host, inference_port=ns.port,
                            management_port=ns.management_port, metrics_port=ns.metrics_port,
                            token_auth=not ns.disable_token_auth)
        print(f"starting TorchServe in {workdir} ...", flush=True)
        server.start(timeout=ns.timeout)
        print(f"model {name!r} is ready\n"
              f"  inference   {server.inference_url}/predictions/{name}\n"
              f"  OpenAI      {server.inference_url}/predictions/{name}/1.0/v1\n"
              f"  management  {server.management_url}\n"
              f"  metrics     {server.metrics_url}/metrics\n"
              f"  logs        {server.log_dir}" + (" (removed on stop)" if created else ""))
        if server.token_auth:
            print(f"  token authorization is ON: keys in {server.key_file} (send 'Authorization: Bearer <inference key>')")
        else:
            print("  token authorization is OFF")
        print("Ctrl-C to stop.", flush=True)

    def remove_workdir():
        if created:
            shutil.rmtree(workdir, ignore_errors=True)

    def force():
        if server is not None:
            server.stop(force=True)
        remove_workdir()

    started = False
    try:
        started = wait_for_stop_signal(lambda: server.process is not None and server.process.poll() is None,
                                       force=force, starting=start)
    finally:
        print("stopping TorchServe ...", flush=True)
        begin = time.monotonic()
        try:
            if server is not None:
                server.stop()
        finally:
            remove_workdir()
        print(f"stopped in {time.monotonic() - begin:.1f}s", flush=True)
    return 0 if started else 1


def wait_for_stop_signal(alive, force=None, starting=None) -> bool:
    """Block until SIGINT or SIGTERM (also when started in the background, where a shell
    leaves SIGINT ignored), or until `alive()` turns false.

    `starting()`, when given, runs first; a signal while it runs interrupts it (it sees a
    KeyboardInterrupt) and the call returns False. The handlers stay installed after the call:
    while the caller then stops the server, a second signal calls `force()` (kill what the server
    started, remove its files), prints "forcing exit" and ends the process at once with status
    128 + the signal number."""
    import os
    import signal

    state = {"signals": 0, "starting": starting is not None}

    def on_signal(signum, _frame):
        state["signals"] += 1
        if state["signals"] == 1:
            if state["starting"]:
                state["starting"] = False  # the next signal forces exit, even during the stop that follows
                raise KeyboardInterrupt
            return
        try:
            print(f"second signal ({signal.Signals(signum).name}): forcing exit", flush=True)
            if force is not None:
                force()
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if starting is not None:
        try:
            starting()
        except KeyboardInterrupt:
            if state["signals"] == 0:
                raise  # not our signal
            return False
        finally:
            state["starting"] = False
        if state["signals"]:
            return True
    while not state["signals"] and alive():
        time.sleep(0.2)
    return True


def cmd_serve_pytriton(ns: argparse.Namespace) -> int:
    import logging

    from pagedbackend.adapters.pytriton import PyTritonServer

    name = ns.name or "pagedbackend"
    if ns.model_repository:
        from pagedbackend.adapters.pytriton.repository import read_model_repository

        given = [s.flag for s in EngineArgs.settings()
                 if (getattr(ns, s.name) is not None if s.name == "model" else getattr(ns, s.name) != s.default)]
        if given or ns.name:
            raise SystemExit(f"with --model-repository each model's engine arguments come from its model.json and its "
                             f"name from its directory; drop {', '.join(given + (['--name'] if ns.name else []))}")
        models = read_model_repository(ns.model_repository)
        server = PyTritonServer(models=models, host=ns.host, http_port=ns.http_port, grpc_port=ns.grpc_port,
                                metrics_port=ns.metrics_port, engine_metrics_port=ns.engine_metrics_port)
        names = list(models)
    else:
        if ns.model is None:
            raise SystemExit("give --model DIR, or --model-repository DIR (a Triton vLLM-backend model repository)")
        server = PyTritonServer(engine_args_from(ns), model_name=name, host=ns.host, http_port=ns.http_port,
                                grpc_port=ns.grpc_port, metrics_port=ns.metrics_port,
                                engine_metrics_port=ns.engine_metrics_port)
        names = [name]

    def stop_resource_tracker():
        # PyTriton's tensor store starts this process's multiprocessing resource tracker; wait
        # for it to finish here, so that no process of ours outlives the command.
        try:
            from multiprocessing import resource_tracker

            resource_tracker._resource_tracker._stop()
        except Exception:  # noqa: BLE001 - it then exits on its own, a moment later
            pass

    def force():
        logging.disable(logging.CRITICAL)  # the threads still running would only report the kill
        server.kill()
        stop_resource_tracker()

    def start():
        print("starting Triton (PyTriton) ...", flush=True)
        server.start()
        print("".join(f"model {n!r} is ready\n  HTTP            {server.http_url}/v2/models/{n}/generate_stream\n"
                      for n in names) +
              f"  gRPC            {server.grpc_url}\n"
              f"  Triton metrics  http://{server.host}:{server.metrics_port}/metrics\n"
              f"  engine metrics  {server.metrics.url}\n"
              f"  workspace       {server.workspace} (removed on stop)\n"
              f"On Ctrl-C / SIGTERM running requests get {server.drain_timeout:g}s to finish, then are aborted;\n"
              f"stopping takes at most {server.stop_bound_s:.0f}s. A second Ctrl-C forces exit at once.\n"
              "Ctrl-C to stop.", flush=True)

    started = False
    try:
        started = wait_for_stop_signal(lambda: server.triton is not None and server.triton.is_alive(),
                                       force=force, starting=start)
    finally:
        print("stopping Triton ...", flush=True)
        begin = time.monotonic()
        server.stop()
        stop_resource_tracker()
        print(f"stopped in {time.monotonic() - begin:.1f}s", flush=True)
    return 0 if started else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedbackend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from pagedbackend.tiny_model import ARCHS as TINY_ARCHS  # stdlib-only import: cheap

    t = sub.add_parser("tiny-model", help="build a small random-weight model with an offline-trained tokenizer")
    t.add_argument("--arch", default="llama", choices=TINY_ARCHS)
    t.add_argument("--out", required=True)
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=None, help="default: the arch's (2; gemma3 3)")
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--num-kv-heads", type=int, default=2)
    t.add_argument("--intermediate-size", type=int, default=None)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--max-position-embeddings", type=int, default=1024)
    t.add_argument("--sliding-window", type=int, default=None, help="default: the arch's; 0 turns it off")
    t.add_argument("--rope-scaling", default=None, help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\'')
    t.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--init-std", type=float, default=None, help="default: the arch's (0.02 for the first four)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-shard-size", default=None, help="e.g. 200KB to write a sharded checkpoint")
    t.set_defaults(func=cmd_tiny_model)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    _add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("archive", help="package a model for TorchServe with torch-model-archiver")
    a.add_argument("--model", required=True, help="Hugging Face model directory")
    a.add_argument("--name", required=True)
    a.add_argument("--export-path", default="model_store")
    a.add_argument("--config", default=None, help="model-config.yaml (default: the template in model_store/)")
    a.add_argument("--no-archive", action="store_true", help="write a directory instead of a .mar")
    a.add_argument("--version", default="1.0")
    a.add_argument("--point-to-model", action="store_true",
                   help="do not copy the weights: the archive's handler.model_path points at --model")
    _add_parallel_args(a)
    a.set_defaults(func=cmd_archive)

    s = sub.add_parser("serve", help="serve a model with a framework")
    frameworks = s.add_subparsers(dest="framework", required=True)
    ts = frameworks.add_parser("torchserve", help="archive + start TorchServe + wait until ready")
    ts.add_argument("--model", required=True)
    ts.add_argument("--name", default=None, help="model name (default: the directory name)")
    ts.add_argument("--config", default=None)
    ts.add_argument("--host", default="127.0.0.1")
    ts.add_argument("--port", type=int, default=8080, help="inference port")
    ts.add_argument("--management-port", type=int, default=8081)
    ts.add_argument("--metrics-port", type=int, default=8082)
    ts.add_argument("--workdir", default=None, help="TorchServe's working directory (default: a new temp dir)")
    ts.add_argument("--disable-token-auth", action="store_true")
    ts.add_argument("--timeout", type=float, default=600)
    _add_parallel_args(ts)
    ts.set_defaults(func=cmd_serve_torchserve)

    pt = frameworks.add_parser("pytriton", help="serve with PyTriton (Triton's vLLM-backend interface)")
    _add_engine_args(pt)
    for action in pt._actions:  # --model, or a repository of models
        if action.dest == "model":
            action.required, action.default = False, None
    pt.add_argument("--model-repository", default=None,
                    help="serve every model of a Triton vLLM-backend model repository (<name>/config.pbtxt with "
                         "backend \"vllm\", <name>/<version>/model.json) instead of --model")
    pt.add_argument("--name", default=None, help="Triton model name (default: pagedbackend)")
    pt.add_argument("--host", default="127.0.0.1")
    pt.add_argument("--http-port", type=int, default=8000)
    pt.add_argument("--grpc-port", type=int, default=8001)
    pt.add_argument("--metrics-port", type=int, default=8002, help="Triton's own metrics")
    pt.add_argument("--engine-metrics-port", type=int, default=8003, help="pagedbackend's engine metrics")
    pt.set_defaults(func=cmd_serve_pytriton)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
