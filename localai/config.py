"""Settings: typed, validated once, and the only module that reads the environment.

Precedence, lowest first: built-in defaults < $LOCALAI_HOME/config.toml < LOCALAI_* environment
variables < explicit overrides (command-line flags). Unknown keys in config.toml are an error, so
a typo does not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .durations import parse_duration

KV_TYPES = ("f16", "q8_0", "q4_0")
KV_BITS = (16, 8, 4, 2)  # the torch runner's KV cache (K per channel, V per token)
_BUDGET = re.compile(r"(\d+(\.\d+)?)\s*(%|[KMGT]?(I?B)?)", re.IGNORECASE)
ENGINES = ("llama", "torch", "remote")
# routing.POLICIES, named here so the settings load without torch
EXPERT_POLICIES = ("lru", "lfu", "decay", "freq")
# = localai.index.vectors.CODECS (a test checks)
INDEX_CODECS = ("int8", "q4r", "int4", "bin1", "f32")


class ConfigError(ValueError):
    """A setting has a value localai cannot use; the message names the setting and its source."""


def default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "localai"


def physical_cores() -> int:
    n = os.cpu_count() or 1
    try:  # count distinct (package, core) pairs: hyper-threads slow llama.cpp down
        cores = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "core id" in block:
                    cores.add((block.get("physical id"), block["core id"]))
                block = {}
            elif ":" in line:
                k, v = line.split(":", 1)
                block[k.strip()] = v.strip()
        return min(n, len(cores)) if cores else n
    except OSError:
        return n


@dataclass
class Settings:
    home: Path = field(default_factory=default_home)
    models_dir: Path | None = None  # default: home / "models"
    model: str = "qwen2.5-coder-1.5b"  # default chat model
    embed_model: str = "minilm-l6-int8"
    index_codec: str = "q4r"  # vector codes of a new index; trade-offs in BENCHMARKS.md
    # re-score the vector search's top N with embeddings recomputed from the files' text (exact
    # cosine from approximate codes at ~8 ms a chunk; what makes 48-byte bin1 codes usable)
    vector_rescore: int = 0
    # where the document index lives: "" is index.db under home; a libpq URI
    # (postgresql://user@host/db, or ?host=/socket/dir) keeps it in a PostgreSQL database that
    # several machines share (needs the postgres extra: pip install 'localai[postgres]')
    index_store: str = ""
    engine: str = "llama"
    context_length: int = 8192  # capped at the model's trained context
    threads: int = field(default_factory=physical_cores)
    type_k: str = "f16"
    type_v: str = "f16"
    k_bits: int = 16  # torch runner only; llama.cpp uses type_k / type_v
    v_bits: int = 16
    # torch runner, MoE models: RAM for the experts, read from disk on demand (bytes such as
    # 4G, or a share of all expert bytes such as 40%); empty: all in place in the memory map if
    # they fit in what the RAM budget leaves the model (weights, runtime, KV), else that much
    expert_budget: str = ""
    # read each layer's likely experts while the layer before computes; off by default: on a
    # 2-core machine with a slow disk it read 17-30% more and lost 0-13% (BENCHMARKS.md)
    expert_prefetch: bool = False
    # which expert leaves the budget for a new one: "freq" (the most asked-for stay; a rarer one
    # is read for its use only), "lru", "lfu" or "decay" (routing.POLICIES; BENCHMARKS.md)
    expert_policy: str = "freq"
    # torch runner: tokens a decode step attends to at most (4096, 4K, or a share of the
    # context such as 10%): the attention sink, the pages whose keys score best for the query,
    # and the recent window; contexts under it stay dense (and exact). Empty: always dense
    attn_budget: str = ""
    # torch runner, with an attn_budget: a prompt's chunks past it read the same way (their own
    # tokens, the sink and the pages a sample of their queries wants most; the others as
    # estimates): prefill at 16K in 0.74 of the dense time, but at 16K the model then finds
    # fewer facts in the prompt (BENCHMARKS.md), so it is off by default
    sparse_prefill: bool = False
    # torch runner, with an attn_budget: RAM for the KV cache (bytes such as 64M, or a share of
    # the cache all in RAM such as 25%); the quantized pages beyond it live in a file under
    # home/kv-pages (deleted with the cache) and are read as steps select them. Empty: all in RAM
    # if it fits in what the RAM budget leaves after the weights and the runtime, else that much
    kv_budget: str = ""
    trace_routing: str = ""  # torch runner, MoE models: write each layer's routing here (JSONL)
    # llama engine: disk for answers' passages' KV under home/kv/passages (a passage retrieved
    # again is put back, not computed); least recently used go first; 0: none kept
    passage_kv_bytes: int = 512 * 2**20
    # "exact": a passage's KV serves only after the same tokens at the same place (answers as
    # if computed whole); "moved": wherever it lands (it keeps what it saw when computed: faster
    # on new questions, fewer verified citations in BENCHMARKS.md)
    passage_kv_reuse: str = "exact"
    # engine "remote": an OpenAI-compatible server (another localai, llama-server, vLLM, ...)
    remote_url: str = ""  # e.g. http://gpu-box:8765 (a trailing /v1 is fine)
    remote_api_key: str = field(default="", repr=False)  # its bearer token; never printed
    ram_budget_bytes: int | None = None  # default: 75% of physical RAM
    host: str = "127.0.0.1"
    port: int = 8765
    # memory that gives itself back (keepalive.py, pressure.py); durations as Ollama writes them
    keep_alive: str = "5m"  # a loaded model unloads after this long without requests; -1 never
    daemon_idle_exit: str = "30m"  # a daemon the TUI started exits after this long unasked
    pressure_interval: str = "2s"  # how often available memory is checked
    pressure_min_available_bytes: int | None = None  # default: 10% of RAM, 256 MiB .. 2 GiB
    pressure_psi_avg10: float = 10.0  # % of the last 10 s some task stalled on memory (PSI)
    meminfo_path: Path = Path("/proc/meminfo")  # tests point these at files they write
    psi_path: Path = Path("/proc/pressure/memory")

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        self.models_dir = Path(self.models_dir).expanduser() if self.models_dir else None
        self.models_dir = self.models_dir or self.home / "models"
        if self.expert_policy not in EXPERT_POLICIES:
            raise ConfigError(
                f"expert_policy must be one of {EXPERT_POLICIES}, not {self.expert_policy!r}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        self._check_remote()
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise ConfigError(f"{name} must be one of {KV_TYPES}, not {getattr(self, name)!r}")
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in KV_BITS:
                raise ConfigError(f"{name} must be one of {KV_BITS}, not {getattr(self, name)!r}")
        if self.expert_budget and not _BUDGET.fullmatch(self.expert_budget.strip()):
            raise ConfigError(
                f"expert_budget is bytes (4G, 512M) or a share (40%), not {self.expert_budget!r}"
            )
        if self.attn_budget and not _BUDGET.fullmatch(self.attn_budget.strip()):
            raise ConfigError(
                f"attn_budget is tokens (4096, 4K) or a share of the context (10%), not "
                f"{self.attn_budget!r}"
            )
        if self.kv_budget and not _BUDGET.fullmatch(self.kv_budget.strip()):
            raise ConfigError(
                f"kv_budget is bytes (64M, 1G) or a share (25%), not {self.kv_budget!r}"
            )
        if self.passage_kv_reuse not in ("moved", "exact"):
            raise ConfigError(
                f"passage_kv_reuse must be moved or exact, not {self.passage_kv_reuse!r}"
            )
        if self.index_codec not in INDEX_CODECS:
            raise ConfigError(
                f"index_codec must be one of {INDEX_CODECS}, not {self.index_codec!r}"
            )
        if self.index_store and not self.index_store.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"index_store is empty (index.db under home) or a postgresql:// URI, not "
                f"{self.index_store!r}"
            )
        if not 0 <= self.vector_rescore <= 1000:
            raise ConfigError(f"vector_rescore must be in 0..1000, not {self.vector_rescore}")
        if self.context_length < 64:
            raise ConfigError(f"context_length must be at least 64, not {self.context_length}")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, not {self.threads}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, not {self.port}")
        for name in ("keep_alive", "daemon_idle_exit", "pressure_interval"):
            try:
                parse_duration(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from e
        if not self.pressure_interval_s:
            raise ConfigError("pressure_interval must be a positive duration, e.g. 2s")
        self.meminfo_path, self.psi_path = Path(self.meminfo_path), Path(self.psi_path)

    def _check_remote(self) -> None:
        url = self.remote_url.strip()
        if url and not re.match(r"https?://[^/\s]+", url):
            raise ConfigError(f"remote_url must be an http:// or https:// URL, not {url!r}")
        if self.engine == "remote" and not url:
            raise ConfigError(
                "engine remote needs remote_url (config.toml, $LOCALAI_REMOTE_URL or "
                "--remote-url): the address of an OpenAI-compatible server, "
                "e.g. http://gpu-box:8765"
            )

    @property
    def keep_alive_s(self) -> float | None:
        """Seconds a model stays loaded after its last request; None: forever."""
        return parse_duration(self.keep_alive)

    @property
    def daemon_idle_exit_s(self) -> float | None:
        return parse_duration(self.daemon_idle_exit)

    @property
    def pressure_interval_s(self) -> float | None:
        return parse_duration(self.pressure_interval)

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    def as_dict(self) -> dict:
        """The settings for display (`localai status --json`): the API key only as set or not."""
        d = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        d["remote_api_key"] = "(set)" if self.remote_api_key else ""
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_ENV = {name: f"LOCALAI_{name.upper()}" for name in _FIELDS}
_ENV["models_dir"] = "LOCALAI_MODELS"


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}  # fmt: skip


def _coerce(name: str, value: object, source: str) -> object:
    kind = _FIELDS[name].type
    try:
        if kind == "bool" and not isinstance(value, bool):
            word = str(value).strip().lower()
            if word not in _BOOLS:
                raise ValueError(word)
            return _BOOLS[word]
        if "int" in kind and not isinstance(value, int):
            return int(str(value).replace("_", ""))
        if "float" in kind and not isinstance(value, float):
            return float(str(value))
        if "Path" in kind:
            return Path(str(value))
        if kind == "str":
            return str(value)
    except ValueError as e:
        raise ConfigError(f"{name} from {source}: {value!r} is not a valid {kind}") from e
    return value


def load_settings(home: str | Path | None = None, **overrides: object) -> Settings:
    """Build Settings from config.toml, the environment and `overrides` (None values ignored)."""
    env = os.environ
    home_path = Path(home or env.get("LOCALAI_HOME") or default_home()).expanduser()
    values: dict[str, object] = {"home": home_path}
    cfg = home_path / "config.toml"
    if cfg.is_file():
        try:
            data = tomllib.loads(cfg.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{cfg}: {e}") from e
        unknown = set(data) - set(_FIELDS) - {"home"}
        if unknown:
            raise ConfigError(
                f"{cfg}: unknown setting(s) {sorted(unknown)}; known: {sorted(_FIELDS)}"
            )
        values.update({k: _coerce(k, v, str(cfg)) for k, v in data.items() if k != "home"})
    for name, var in _ENV.items():
        if name != "home" and var in env and env[var] != "":
            values[name] = _coerce(name, env[var], f"${var}")
    for name, value in overrides.items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _coerce(name, value, "the command line")
    return Settings(**values)
