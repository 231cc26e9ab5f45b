"""The Celery app and all of its configuration, built from Settings."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu.transport import memory

import workers.broker  # noqa: F401  (registers the atomic folder transport as "filesystem")
from pipeline.settings import Settings, SettingsError, mask_url

# Polling transports wait this long between reads of an empty queue; Celery's default of
# 1 s costs a tenth of the efficiency of 1 s renders (measured: bench/README.md).
POLLING_INTERVAL = 0.1
# How long the in-memory broker keeps the consumer's loop waiting for a message.
DRAIN_TIMEOUT = 0.2


class MemoryTransport(memory.Transport):
    """kombu's in-memory broker (`run`), with the timing of an in-process queue.

    It is polled every 0.02 s (a read only takes a queue's lock), so a job's first message
    is taken within 20 ms of being queued. It hands the worker's consumer loop back every
    DRAIN_TIMEOUT when no message comes, not every 2 s (Celery's synloop asks for 2 s):
    stopping the worker waits for that loop, so every `run` lasted up to 2 s past its job."""

    polling_interval = 0.02

    def drain_events(self, connection: object, timeout: float | None = None) -> object:
        if timeout is not None:
            timeout = min(timeout, DRAIN_TIMEOUT)
        return super().drain_events(connection, timeout=timeout)


def create_app(settings: Settings, *, broker_url: str | None = None) -> Celery:
    broker = broker_url or settings.broker_url
    app = Celery("imagebatch", broker=broker, set_as_current=True)
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=2,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings, broker),
        task_default_queue="imagebatch",
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=not broker.startswith("memory://"),
    )
    if broker.startswith("memory://"):
        app.conf.broker_transport = MemoryTransport
    app.conf.imagebatch_settings = settings
    from workers import tasks

    tasks.register(app)
    return app


def connected_app(settings: Settings) -> Celery:
    """The Celery app on a broker that answered, with the shared limits' Redis too (or a
    one-line SettingsError naming the variable): checked before anything is written or any
    worker starts."""
    app = create_app(settings)
    check_broker(app)
    check_shared_redis(settings)
    return app


def worker_options(concurrency: int) -> dict[str, object]:
    """How every Celery worker of ours runs, `imagebatch worker` and the in-process one
    alike: a threads pool (each thread hands its render to the process's one event loop),
    no mingle or gossip (SQL, not the workers, knows who does what). (Celery's `-O fair`
    is for its prefork pool only: a threads pool ignores it.)"""
    return {"pool": "threads", "concurrency": concurrency, "without_mingle": True,
            "without_gossip": True}


def check_broker(app: Celery) -> None:
    """Raise SettingsError naming IMAGEBATCH_BROKER_URL when the broker does not answer, so
    a command says so in one line before it writes anything or starts a worker."""
    url = app.conf.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return  # the embedded broker is a folder (created above) or memory
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2,
                                         timeout=10)
    except Exception as exc:  # kombu's and redis-py's errors, which share no base class
        raise SettingsError(f"IMAGEBATCH_BROKER_URL={mask_url(url)!r}: cannot reach the "
                            f"broker: {mask_url(str(exc))}") from None


def check_shared_redis(settings: Settings) -> None:
    """Raise SettingsError when the Redis of the shared limits does not answer: renders
    would otherwise wait for it forever (it may be restarting mid-job, not at start-up)."""
    url = settings.shared_redis_url
    if url is None:
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        name = "IMAGEBATCH_REDIS_URL" if settings.redis_url else "IMAGEBATCH_BROKER_URL"
        raise SettingsError(f"{name}={mask_url(url)!r}: cannot reach Redis (for the limits "
                            f"shared by workers): {mask_url(str(exc))}") from None
    finally:
        client.close()


def _transport_options(settings: Settings, broker: str) -> dict[str, object]:
    if broker.startswith("memory://"):
        return {}  # MemoryTransport's own timing
    if broker.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacked task after visibility_timeout even while it still runs;
        # it must outlast the longest render (deadline, media, retries) or we pay twice.
        timeout = settings.visibility_timeout or settings.render_deadline * 2 + 600
        return {"visibility_timeout": int(timeout)}
    if broker.startswith("filesystem://"):
        queue = settings.broker_dir / "queue"
        control = settings.broker_dir / "control"
        for folder in (queue, control):
            Path(folder).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(control),
            "polling_interval": POLLING_INTERVAL,
        }
    return {"polling_interval": POLLING_INTERVAL}
