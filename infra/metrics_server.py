"""Live metrics shared by both services: a Prometheus endpoint serving ``stablerep_*`` samples.

Each service keeps the counters it already has (``PoolStats``/``ServerStats`` in the generator,
replay and source stats in the trainer) and hands a plain snapshot to a :class:`SnapshotCollector`
whenever it has a fresh one; a scrape turns the latest snapshot into metric families. So the
numbers on the endpoint are the numbers the services log and the benchmarks read, and a scrape
never touches the training or generation loop.

A snapshot is a list of :class:`Sample`: ``(name, kind, help, value, labels)``, ``kind`` being
``"gauge"`` or ``"counter"`` (a counter name ends in ``_total``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

METRIC_PREFIX = "stablerep_"


@dataclass(frozen=True)
class Sample:
    name: str
    kind: str
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.startswith(METRIC_PREFIX):
            raise ValueError(f"metric {self.name!r} must start with {METRIC_PREFIX!r}")
        if self.kind not in ("gauge", "counter"):
            raise ValueError(f"metric {self.name!r}: kind must be gauge or counter, got {self.kind!r}")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name!r}: counters, and only counters, end in _total")


class SnapshotCollector:
    """A prometheus-client collector that serves the latest snapshot given to :meth:`set`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[Sample] = []

    def set(self, samples: list[Sample]) -> None:
        with self._lock:
            self._samples = list(samples)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            samples = list(self._samples)
        families: dict[str, object] = {}
        for s in samples:
            family = families.get(s.name)
            if family is None:
                cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                # CounterMetricFamily appends _total itself
                base = s.name.removesuffix("_total") if s.kind == "counter" else s.name
                family = families[s.name] = cls(base, s.help, labels=sorted(s.labels))
            family.add_metric([s.labels[k] for k in sorted(s.labels)], float(s.value))
        yield from families.values()


class MetricsServer:
    """Serve a :class:`SnapshotCollector` over HTTP at ``http://ADDR:PORT/metrics`` (port 0 picks one)."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, got {port}")
        self.collector = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            raise OSError(f"--metrics-port {port}: cannot listen on {addr}:{port}: {err}") from err
        self.port = self._server.server_port
        self.url = f"http://{'127.0.0.1' if addr in ('0.0.0.0', '') else addr}:{self.port}/metrics"

    def set(self, samples: list[Sample]) -> None:
        self.collector.set(samples)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
