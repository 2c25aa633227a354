"""The private names of pinned libraries that lmscale relies on, where those versions have no public call for
the job. Each test fails the day an upgrade removes the name, pointing at the one place that uses it."""

import inspect

import torch.distributed.distributed_c10d as c10d
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter


def test_live_process_groups_can_be_given_another_timeout() -> None:
    """lmscale.train.engine.set_collective_timeout."""
    assert callable(c10d._set_pg_timeout)
    assert hasattr(c10d._world, "pg_map")


def test_zero_optimizers_keep_the_pre_clip_gradient_norm() -> None:
    """lmscale.train.engine.pre_clip_grad_norm: every optimizer DeepSpeed wraps a run's parameters in sets
    ``_global_grad_norm`` before it steps."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for optimizer in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer):
        assert "self._global_grad_norm =" in inspect.getsource(optimizer), optimizer.__name__


def test_loader_iterators_can_stop_their_workers() -> None:
    """lmscale.data.stream.stop_loader_workers."""
    assert callable(_MultiProcessingDataLoaderIter._shutdown_workers)


def test_ray_exposes_the_gcs_client_and_token_loader() -> None:
    """lmscale.data.ray_cluster: the probe of a head's GCS and token authentication."""
    from ray._raylet import AuthenticationTokenLoader, Config, GcsClient

    assert callable(GcsClient)
    assert callable(AuthenticationTokenLoader.instance)
    assert callable(Config.initialize)


def test_gnu_translations_keep_their_messages_in_a_dictionary() -> None:
    """lmscale.data.translation_pairs.catalog_messages: the standard library lists no catalog's messages."""
    import gettext
    import io
    import struct

    # A compiled catalog of one message ("hello" -> "hallo"), in the .mo layout.
    ids, strs = [b"", b"hello"], [b"Content-Type: text/plain; charset=UTF-8\n", b"hallo"]
    offset = 28 + 16 * len(ids)
    table, blob = [], b""
    for items in (ids, strs):
        for item in items:
            table.append((len(item), offset + len(blob)))
            blob += item + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, len(ids), 28, 28 + 8 * len(ids), 0, 0)
    body = b"".join(struct.pack("<2I", *entry) for entry in table)
    catalog = gettext.GNUTranslations(io.BytesIO(header + body + blob))
    assert catalog._catalog["hello"] == "hallo"  # type: ignore[attr-defined]
