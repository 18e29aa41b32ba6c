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
  prism serve --prism runs/demo/prism --engine vllm        # vLLM + the gate router, one command
  prism serve --route-only --prism runs/demo/prism --upstream http://127.0.0.1:8001/v1 \\
      --base-name Qwen/Qwen2.5-7B-Instruct --lora-name prism
"""


def add_parser(sub) -> None:
    from ..command_settings import ServeSettings
    from ..options import add_flags

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server for a PRISM artifact (or route-only proxy)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, ServeSettings)
    add_common(p)
    p.set_defaults(func=run)


def options_from_args(args):
    """ServeSettings from parsed flags (validated; a PrismError for a bad value or combination), with
    the API keys read from the environment."""
    import dataclasses

    from ..command_settings import ServeSettings
    from ..options import settings_from_args

    options = settings_from_args(ServeSettings, args)
    return dataclasses.replace(
        options,
        api_key=options.api_key or os.environ.get("PRISM_API_KEY") or None,
        upstream_api_key=os.environ.get(options.upstream_api_key_env) or None,
    )


def run(args) -> int:
    from ..engines import engine_names, engine_spec
    from ..errors import PrismError

    options = options_from_args(args)
    spec = engine_spec(options.engine.engine)
    if spec.gated_model:  # PRISM's HTTP server on the artifact's GatedModel, in this process
        return _serve(options)
    if spec.adapter_server is None or options.engine.base_url:
        here = " or ".join(f"--engine {n}" for n in engine_names() if engine_spec(n).gated_model)
        starts = " or ".join(f"--engine {n}" for n in engine_names() if engine_spec(n).adapter_server)
        raise PrismError(
            f"prism serve runs the artifact here ({here}) or starts a server for it ({starts}); to route "
            "to a server you run, use --route-only --upstream URL --base-name NAME --lora-name NAME"
        )
    if options.route_only or options.upstream:
        raise PrismError(
            f"--engine {spec.name} starts its own upstream; drop --route-only/--upstream (or use them "
            "without --engine to route to a server you run)"
        )
    import dataclasses

    upstream, adapter_name = start_upstream(options, args.quiet)
    try:
        return _serve(
            dataclasses.replace(
                options,
                route_only=True,
                upstream=upstream.base_url,
                base_name=upstream.served_name,
                lora_name=adapter_name,
            )
        )
    finally:
        upstream.stop()


def start_upstream(options, quiet: bool = False):
    """A server engine (``--engine vllm``) started with the artifact's base model and adapter:
    ``(server, adapter name)``."""
    from ..gated.remote import start_for_artifact

    return start_for_artifact(options.engine, options.load.prism, quiet=quiet)


def _serve(options) -> int:
    import logging
    import sys

    from ..serve.backend import load_backend
    from ..serve.http import PrismServer, check_address, warn_if_exposed
    from ..serve.upstream import Forwarder

    load = options.load
    check_address(options)
    backend = load_backend(
        load.prism,
        load.device,
        load.dtype,
        route_only=options.route_only,
        name=options.model_name,
        trust_remote_code=load.trust_remote_code,
    )
    forwarder = (
        Forwarder(options.upstream, options.upstream_api_key, options.upstream_timeout_s)
        if options.route_only
        else None
    )
    server = PrismServer(backend, options, forwarder).start()
    warn_if_exposed(options)
    mode = f"route-only -> {options.upstream}" if forwarder else "local"
    logging.getLogger("prism_persona").warning(
        "serving %s (%s) at %s%s", load.prism, mode, server.url, " (API key required)" if options.api_key else ""
    )
    print(f"prism serve: listening on {server.url}", file=sys.stderr, flush=True)
    server.serve_until_signal()
    return 0
