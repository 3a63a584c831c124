"""``adaptkit serve``: many adapters of any kind over one base, behind an OpenAI-compatible HTTP API.

    adaptkit serve path/to/base --adapters sql=adapters/sql,adapters/tone --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="sql", prompt="SELECT", max_tokens=16, temperature=0)

The request's ``model`` names the adapter (the base's name: no adapter). Concurrent requests for
different adapters, of any kinds (LoRA, prefix, prompt, bottleneck, ...), are decoded in one batch
by the scheduler (``scheduler.py``: continuous batching, one thread owning the Engine); at most
``max_resident`` adapters are in memory (``residency.py``). Endpoints are in ``app.py``,
request checks and the error shape in ``api.py``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from adaptkit.compositions import Mix
from adaptkit.errors import InvalidArgumentError, MissingDependencyError, RequestError
from adaptkit.serving.api import ADAPTER_NAME, unknown_model_error
from adaptkit.serving.guards import API_KEY_ENV, Limits
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.residency import AdapterPool
from adaptkit.serving.scheduler import Scheduler

log = logging.getLogger("adaptkit.serve")


class Server:
    """One Engine behind the OpenAI API: the adapters it serves, its scheduler and its counters.

    Args:
        engine: an ``ak.Engine`` over a causal LM with a tokenizer; the server's scheduler thread owns it.
        adapters: ``{name: path}`` served from the start (each read now, so a bad path fails here).
        base_name: the ``model`` that means "no adapter" (default: the base folder's name).
        adapter_dir: the only folder runtime loading may read from.
        allow_runtime_loading: enable ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.
        max_batch: rows decoded together; max_queue: requests waiting beyond that (more: HTTP 429).
        max_resident: adapters in memory at once (None: all); idle ones are evicted least recently used.
        request_timeout: default per-request limit in seconds (a request's ``timeout`` overrides it).
        default_max_tokens: ``max_tokens`` when a request gives none.
        register_all: serve every adapter folder in ``adapter_dir`` too, named by its folder name; only
            the config files are read now, the rest when a request first needs it.
        limits: body size, prompt characters, read deadline, connections (``guards.Limits``).
        api_key: when set, every ``/v1/*`` request needs ``Authorization: Bearer <api_key>``.
    """

    def __init__(self, engine, adapters: dict[str, str | os.PathLike] | None = None, base_name: str | None = None,
                 adapter_dir: str | os.PathLike | None = None, allow_runtime_loading: bool = False, max_batch: int = 8,
                 max_queue: int = 64, max_resident: int | None = None, request_timeout: float | None = None,
                 default_max_tokens: int = 16, register_all: bool = False, limits: Limits | None = None,
                 api_key: str | None = None):
        from adaptkit.formats.detect import read_adapter

        if engine.tokenizer is None:
            raise InvalidArgumentError(f"{engine.base.path} has no tokenizer files; the server needs one")
        if allow_runtime_loading and adapter_dir is None:
            raise InvalidArgumentError("runtime loading needs --adapter-dir (the only folder it may read from)")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise InvalidArgumentError(f"--adapter-dir {adapter_dir}: not a folder")
        self.engine = engine
        self.limits = limits or Limits()
        self.api_key = api_key or None
        self.base_name = base_name or Path(engine.base.path).name
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.allow_runtime_loading = allow_runtime_loading
        self.request_timeout = request_timeout
        self.default_max_tokens = default_max_tokens
        self.pool = AdapterPool(engine, max_resident)
        for name, path in (adapters or {}).items():
            if not ADAPTER_NAME.match(name) or name == self.base_name:
                raise InvalidArgumentError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' and not "
                                           f"the base model's name {self.base_name!r}")
            self.pool.register(name, path, read_adapter(path), evict=False)  # the first K stay loaded
        if register_all:
            if self.adapter_dir is None:
                raise InvalidArgumentError("registering every adapter of a folder needs --adapter-dir")
            self._register_folder(self.adapter_dir)
        config = engine.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.scheduler = Scheduler(engine, self.pool, max_batch=max_batch, max_queue=max_queue, context_length=context)
        self.metrics = ServeMetrics()

    def _register_folder(self, folder: Path) -> None:
        """Every sub-folder of ``folder`` that holds an adapter, by its folder name (others are skipped)."""
        for name, (path, kind) in adapter_folders(folder, self.base_name, set(self.pool.names)).items():
            self.pool.register(name, path, load=False, root=folder, kind=kind)

    def start(self) -> Server:
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()
        self.pool.close()

    def healthy(self) -> bool:
        return self.scheduler.alive

    def app(self):
        """The FastAPI application (``pip install adaptkit[serve]``)."""
        try:
            from adaptkit.serving.app import create_app
            from adaptkit.serving.guards import guard
        except ImportError as exc:
            raise MissingDependencyError(f"serving needs fastapi and uvicorn ({exc}); pip install 'adaptkit[serve]'") from exc
        return guard(create_app(self), self.limits, self.api_key)

    # ----------------------------------------------------------------- request helpers (event loop thread)
    def known_models(self) -> list[str]:
        return [self.base_name, *self.pool.names]

    def resolve_model(self, model: str, adapters: dict[str, float] | None):
        """(the row entry, the metrics label) of a request's ``model`` and optional ``adapters`` mix."""
        return resolve_model(model, adapters, self.base_name, self.pool.serves, self.known_models)

    def unknown_model(self, name: str, param: str) -> RequestError:
        return unknown_model_error(name, param, self.known_models())

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt (text: with the tokenizer's special tokens, as ``Engine.generate``)."""
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
            return self.engine.encode([prompt])[0]
        vocab = self.engine.base.facts.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    def check_prompt_chars(self, count: int, param: str) -> None:
        """Refuse a prompt longer than ``--max-prompt-chars`` before any tokenizing."""
        if count > self.limits.max_prompt_chars:
            raise RequestError(f"{param}: {count} characters, over this server's limit of "
                               f"{self.limits.max_prompt_chars} (--max-prompt-chars)", param=param)

    def require_runtime_loading(self) -> None:
        require_runtime_loading(self.allow_runtime_loading)

    def model_cards(self) -> list[dict]:
        """``/v1/models``: the base, then every servable adapter with ``parent`` = the base."""
        return model_cards(self.base_name, self.engine.base.path, {n: self.pool.kind_of(n) for n in self.pool.names})


def resolve_model(model: str, adapters: dict[str, float] | None, base_name: str, serves, known):
    """(the row entry, the metrics label) of a request's ``model`` and optional ``adapters`` mix; ``serves(name)``
    says whether an adapter is served, ``known()`` lists every servable model (for the 404's message)."""
    if adapters is not None:
        if model != base_name:
            raise RequestError(f"adapters: a weighted mix is applied to the base; set model to {base_name!r}",
                               param="adapters")
        if not adapters:
            raise RequestError("adapters: give at least one {name: weight}", param="adapters")
        for name in adapters:
            if not serves(name):
                raise unknown_model_error(name, "adapters", known())
        try:
            return Mix(adapters), "mix"
        except InvalidArgumentError as exc:
            raise RequestError(f"adapters: {exc}", param="adapters") from exc
    if model == base_name:
        return None, base_name
    if serves(model):
        return model, model
    raise unknown_model_error(model, "model", known())


def model_cards(base_name: str, base_path, kinds: dict[str, str | None],
                placement: dict[str, list[str]] | None = None) -> list[dict]:
    """``/v1/models``: the base, then each adapter of ``kinds`` (name -> kind) with ``parent`` = the base, and
    with ``placement`` the replicas each one is resident on."""
    created = int(Path(base_path).stat().st_mtime) if Path(base_path).exists() else 0
    cards = [{"id": base_name, "object": "model", "created": created, "owned_by": "adaptkit", "root": base_name,
              "parent": None}]
    for name in sorted(kinds):
        card = {"id": name, "object": "model", "created": created, "owned_by": "adaptkit", "root": name,
                "parent": base_name, "kind": kinds[name]}
        if placement is not None:
            card["replicas"] = placement.get(name, [])
        cards.append(card)
    return cards


def require_runtime_loading(allowed: bool) -> None:
    if not allowed:
        raise RequestError("runtime adapter loading is off; start the server with --allow-runtime-loading and "
                           "--adapter-dir", status=403, code="runtime_loading_disabled")


def adapter_folders(folder: Path, base_name: str, taken: set[str]) -> dict[str, tuple[Path, str]]:
    """``{folder name: (path, kind)}`` of the sub-folders of ``folder`` that hold an adapter (by their config
    files), skipping names that are not valid adapter names, the base's name and ``taken``."""
    from adaptkit.errors import AdaptkitError
    from adaptkit.formats.detect import detect_kind

    found = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        if not ADAPTER_NAME.match(path.name) or path.name == base_name or path.name in taken:
            continue
        try:
            found[path.name] = (path, detect_kind(path))
        except AdaptkitError:
            continue  # not an adapter folder
    return found


class BackgroundServer:
    """A :class:`Server` with uvicorn in a thread on ``host:port`` (port 0: any free one); for tests and benchmarks.

        with BackgroundServer(server) as running:
            OpenAI(base_url=running.url + "/v1", api_key="unused")
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from adaptkit.serving.guards import uvicorn_options

        self.server = server
        config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", lifespan="off",
                                **uvicorn_options(server.limits))
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, name="adaptkit-http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.server.start()
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn stopped before it started listening")
            self._thread.join(0.01)
        host, port = self._uvicorn.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._uvicorn.should_exit = True
        self._thread.join()
        self.server.stop()


def warn_if_unprotected(host: str, api_key: str | None) -> bool:
    """Log a warning (and return True) when ``host`` is reachable from elsewhere and no API key is set."""
    if host in ("127.0.0.1", "localhost", "::1") or api_key:
        return False
    log.warning("serving on %s without an API key: anyone who can reach this address can use the server; "
                "pass --api-key (or set %s)", host, API_KEY_ENV)
    return True


def serve(base: str | os.PathLike, adapters: dict[str, str | os.PathLike] | None = None, host: str = "127.0.0.1",
          port: int = 8000, quantize: str | None = None, dtype: str = "float32", device: str = "cpu",
          **options) -> None:
    """Load ``base`` and ``adapters`` and serve them until interrupted (``options``: see :class:`Server`)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError("serving needs uvicorn; pip install 'adaptkit[serve]'") from exc
    from adaptkit.engine import Engine
    from adaptkit.serving.guards import uvicorn_options

    warn_if_unprotected(host, options.get("api_key"))
    engine = Engine.from_pretrained(base, dtype=dtype, quantize=quantize, device=device)
    server = Server(engine, adapters, **options).start()
    try:
        uvicorn.run(server.app(), host=host, port=port, log_level="info", **uvicorn_options(server.limits))
    finally:
        server.stop()

