"""Prometheus metrics of one monitor process (prometheus-client).

Counters and histograms are updated by the engine as things happen; gauges that describe
the queue are read from the state store when ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .bemsoft import Kind


class Metrics:
    """The monitor's metrics in their own registry (tests create as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.items_read = Counter("bemsoft_items_read", "Itens novos lidos do LIS",
                                  registry=r)
        self.orders = Counter("bemsoft_orders", "Respostas a POST /requests por resultado",
                              ["outcome"], registry=r)
        # Every outcome is a series from the start: a rate() or an alert on, say,
        # outcome="auth" must see 0, not "no data", before the first such answer.
        for kind in Kind:
            self.orders.labels(kind.value)
        self.retries = Counter("bemsoft_retries", "Pedidos reagendados para nova tentativa",
                               registry=r)
        self.dead_letters = Counter("bemsoft_dead_letters",
                                    "Pedidos enviados ao FAILED_DIR", registry=r)
        self.refused_items = Counter("bemsoft_refused_items",
                                     "Itens recusados pela transformação", registry=r)
        self.send_latency = Histogram(
            "bemsoft_send_latency_seconds", "Duração de POST /requests",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.last_successful_poll = Gauge(
            "bemsoft_last_successful_poll_timestamp_seconds",
            "Momento da última leitura do LIS bem-sucedida (epoch)", registry=r)
        self.queue_depth = Gauge("bemsoft_queue_depth", "Pedidos no outbox por estado",
                                 ["state"], registry=r)
        self.oldest_waiting_age = Gauge(
            "bemsoft_oldest_waiting_age_seconds",
            "Idade do pedido mais antigo ainda não finalizado", registry=r)
        self.catalog_age = Gauge("bemsoft_catalog_age_seconds",
                                 "Idade da cópia do catálogo /tests (-1: sem cópia)",
                                 registry=r)
        self.auth_paused = Gauge("bemsoft_auth_paused",
                                 "1 quando o envio está pausado por token recusado",
                                 registry=r)
        self.lease_held = Gauge("bemsoft_lease_held",
                                "1 quando este processo detém a trava do banco de estado",
                                registry=r)
