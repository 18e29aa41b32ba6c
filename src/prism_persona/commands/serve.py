"""`prism serve`: an OpenAI-compatible HTTP server for a PRISM artifact (or a gate-only router)."""

from __future__ import annotations

import argparse
import os

from .common import add_common

DESCRIPTION = """\
Serve RUN/prism over the OpenAI chat-completions API (/v1/chat/completions, streaming too,
/v1/models, /health). Every request is routed by the gate; responses carry
prism: {"routed", "gate_prob"} and the headers X-Prism-Routed / X-Prism-Gate-Prob. A request can
force routing with "prism": {"force": true|false} (extra_body in the openai client).

With --route-only, only the gate runs here (embeddings + decoder layer 0) and each request is
forwarded to --upstream (e.g. vLLM serving the adapter from `prism export --format vllm`) under
--base-name or --lora-name. Stops gracefully on SIGTERM / Ctrl-C."""

EXAMPLES = """examples:
  prism serve --prism runs/demo/prism
  PRISM_API_KEY=secret prism serve --prism runs/demo/prism --host 0.0.0.0 --port 8000
  prism serve --route-only --prism runs/demo/prism --upstream http://127.0.0.1:8001/v1 \\
      --base-name Qwen/Qwen2.5-7B-Instruct --lora-name prism
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server for a PRISM artifact (or route-only proxy)",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prism", required=True, metavar="ART", help="artifact directory (RUN/prism or a vllm export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env PRISM_API_KEY)")
    p.add_argument("--model-name", default="prism", help="model id shown by /v1/models and in responses")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g = p.add_argument_group("limits and batching")
    g.add_argument("--max-batch", type=int, default=8, help="requests per generate call (default 8)")
    g.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait this long for more requests to batch (default 10)")
    g.add_argument("--queue-size", type=int, default=64, help="queued requests before answering 429 (default 64)")
    g.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts get 400 (default 4096)")
    g.add_argument("--max-tokens", type=int, default=1024,
                   help="cap on max_tokens; larger requests are clamped to it, absent ones get it (default 1024)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504 (default 600)")
    g = p.add_argument_group("route-only (gate here, generation upstream)")
    g.add_argument("--route-only", action="store_true", help="compute the gate locally and forward to --upstream")
    g.add_argument("--upstream", help="upstream OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    g.add_argument("--base-name", help="upstream model name for unrouted requests (the base model)")
    g.add_argument("--lora-name", help="upstream model name for routed requests (the LoRA module)")
    g.add_argument("--upstream-api-key-env", default="UPSTREAM_API_KEY",
                   help="environment variable holding the upstream's API key (default UPSTREAM_API_KEY)")
    add_common(p)
    p.set_defaults(func=run)


def options_from_args(args):
    """ServeOptions from parsed flags (validated; a PrismError for a bad combination)."""
    from ..errors import PrismError
    from ..serve.app import ServeOptions
    from ..serve.api import Limits

    if args.route_only and not (args.upstream and args.base_name and args.lora_name):
        raise PrismError("--route-only needs --upstream URL, --base-name NAME and --lora-name NAME")
    if not args.route_only and (args.upstream or args.base_name or args.lora_name):
        raise PrismError("--upstream/--base-name/--lora-name only apply with --route-only")
    for flag, value in (("--max-batch", args.max_batch), ("--queue-size", args.queue_size),
                        ("--max-prompt-tokens", args.max_prompt_tokens), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise PrismError(f"{flag} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise PrismError(f"--port must be between 0 and 65535, got {args.port}")
    return ServeOptions(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("PRISM_API_KEY") or None,
        model_name=args.model_name, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        queue_size=args.queue_size, limits=Limits(args.max_prompt_tokens, args.max_tokens),
        request_timeout_s=args.request_timeout, upstream=args.upstream or "", base_name=args.base_name or "",
        lora_name=args.lora_name or "", upstream_api_key=os.environ.get(args.upstream_api_key_env) or None,
    )


def run(args) -> int:
    import logging
    import sys

    from ..serve.backend import load_backend
    from ..serve.http import PrismServer, warn_if_exposed
    from ..serve.upstream import Forwarder

    options = options_from_args(args)
    backend = load_backend(args.prism, args.device, args.dtype, route_only=args.route_only, name=options.model_name)
    forwarder = Forwarder(options.upstream, options.upstream_api_key, options.upstream_timeout_s) \
        if args.route_only else None
    server = PrismServer(backend, options, forwarder).start()
    warn_if_exposed(options)
    mode = f"route-only -> {options.upstream}" if forwarder else "local"
    logging.getLogger("prism_persona").warning("serving %s (%s) at %s%s", args.prism, mode, server.url,
                                               " (API key required)" if options.api_key else "")
    print(f"prism serve: listening on {server.url}", file=sys.stderr, flush=True)
    server.serve_until_signal()
    return 0
