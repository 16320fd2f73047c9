"""Generation throughput: one client against N concurrent clients, and llama.cpp on the same GGUF as a peer.

``hiedit serve`` (SmolLM2-135M-Instruct by default, no editor) answers N different prompts, first one
request at a time ("1 client"), then all N at once, ``--rounds`` times ("N clients"); every request
asks for exactly ``--tokens`` greedy tokens (``ignore_eos``). Tokens per second are counted over the
wall time of each phase, side by side in one run, and every concurrent answer is compared with the
answer the same prompt got alone. With ``--llama-python`` (a Python that has ``llama-cpp-python[server]``,
installed for this benchmark only), the same phases run against ``llama_cpp.server`` serving the GGUF file
the model was converted from, with the end-of-text tokens suppressed by ``logit_bias``. The LAST line
printed is JSON.

    python bench/batching.py                                     # hiedit only
    python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install 'llama-cpp-python[server]==0.3.36'
    python bench/batching.py --llama-python /tmp/llamacpp/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUIET_SERVER, Server, emit, free_port, hiedit_home  # noqa: E402

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Apple A5 was created by",
           "Toko Yasuda, the", "The Eiffel Tower is located in", "Once upon a time", "Python is a",
           "The largest planet in the solar system is", "Leonardo da Vinci painted", "Water boils at",
           "The official language of Brazil is", "In 1969, Neil Armstrong", "The chemical symbol for gold is",
           "Tokyo is the capital of", "The author of Hamlet is", "My favourite food is"]


def hiedit_request(url: str, prompt: str, tokens: int) -> tuple[str, int]:
    r = httpx.post(url + "/generate", json={"prompt": prompt, "max_new_tokens": tokens, "ignore_eos": True},
                   timeout=600)
    r.raise_for_status()
    return r.json()["text"], r.json()["tokens"]


def llama_request(url: str, prompt: str, tokens: int, eos: list[int]) -> tuple[str, int]:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                                  "logit_bias": {str(t): -100 for t in eos}}, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]


def measure(ask, prompts: list[str], rounds: int) -> dict:
    """1 client (each prompt alone, one after another), then len(prompts) clients at once, ``rounds`` times."""
    ask(prompts[0])  # warm-up: first-call allocations and lazy initialisation are not throughput
    t0 = time.perf_counter()
    alone = [ask(p) for p in prompts]
    one_s = time.perf_counter() - t0
    one_tokens = sum(n for _, n in alone)
    results: list[list] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        for _ in range(rounds):
            barrier.wait()
            results[i].append(ask(prompts[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    many_s = time.perf_counter() - t0
    many_tokens = sum(n for rs in results for _, n in rs)
    differ = [prompts[i] for i, rs in enumerate(results) if any(text != alone[i][0] for text, _ in rs)]
    return {"one_client_tokens_per_s": round(one_tokens / one_s, 2),
            f"{len(prompts)}_clients_tokens_per_s": round(many_tokens / many_s, 2),
            "ratio": round((many_tokens / many_s) / (one_tokens / one_s), 2),
            "requests": len(prompts) * (1 + rounds), "answers_differing_from_alone": differ,
            "load_average": round(os.getloadavg()[0], 2)}


def run_llama(python: str, gguf: Path, threads: int, prompts: list[str], tokens: int, rounds: int) -> dict:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llamacpp-", suffix=".log", delete=False)
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                             "--n_threads", str(threads), "--n_ctx", "2048", "--verbose", "false"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start in 300 s")
            time.sleep(0.5)
        eos = [0, 2]  # SmolLM2: <|endoftext|>, <|im_end|>
        result = measure(lambda p: llama_request(url, p, tokens, eos), prompts, rounds)
        version = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        return {"llama_cpp_python": version, "gguf": gguf.name, **result}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a known model name (its GGUF is the peer's)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (and prompts)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in the concurrent phase")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of hiedit, n_threads of llama.cpp")
    parser.add_argument("--home", default=None, help="where the model is converted once, under models/ (default: "
                                                     "$HIEDIT_HOME, else hiedit serve's default home)")
    parser.add_argument("--llama-python", default=None, help="a python with llama-cpp-python[server]: adds the peer")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= len(PROMPTS):
        parser.error(f"--clients: 1 to {len(PROMPTS)}")
    prompts = PROMPTS[:args.clients]
    from editor_core.catalog import resolve_model

    model_dir = resolve_model(args.model, Path(args.home) if args.home else hiedit_home())
    server = Server(["--model", model_dir, "--editor", "none", "--rlsedit", "off", "--torch-threads",
                     str(args.threads), *QUIET_SERVER], Path(tempfile.mkdtemp(prefix="hiedit-batching-")),
                    env={"HIEDIT_MAX_CONCURRENT_GENERATIONS": str(args.clients)})
    server.start()
    try:
        ours = measure(lambda p: hiedit_request(server.url, p, args.tokens), prompts, args.rounds)
    finally:
        server.stop()
    print(f"hiedit: {json.dumps(ours)}", file=sys.stderr)
    result = {"model": args.model, "tokens": args.tokens, "clients": args.clients, "threads": args.threads,
              "hiedit": ours}
    if args.llama_python:
        from editor_core.catalog import KNOWN_MODELS

        gguf = KNOWN_MODELS[args.model].fetch(Path(tempfile.mkdtemp(prefix="hiedit-gguf-")))  # what was converted
        peer = run_llama(args.llama_python, gguf, args.threads, prompts, args.tokens, args.rounds)
        print(f"llama.cpp: {json.dumps(peer)}", file=sys.stderr)
        key = f"{args.clients}_clients_tokens_per_s"
        result["llama_cpp"] = peer
        result["hiedit_over_llama_cpp"] = {
            "one_client": round(ours["one_client_tokens_per_s"] / peer["one_client_tokens_per_s"], 3),
            f"{args.clients}_clients": round(ours[key] / peer[key], 3)}
    return emit(result)


if __name__ == "__main__":
    main()
