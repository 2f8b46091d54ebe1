"""Support order in the pseudo-video (`--support-order nearest|farthest`, issue 26 item 1).

SAM 2 gives every conditioning frame's spatial memory the same temporal code (t_pos 0), so the
order reaches the model only through the object pointers' temporal distance. With the same k
supports (most similar first), 'nearest' (default) puts the most similar at frame k-1 (pointer
distance 1) and 'farthest' at frame 0 (distance k). Checked on what memory attention receives:
the spatial memories and their encodings are the same set (frames reversed), the pointer tokens
too, but each support's pointer carries a different temporal encoding. Fidelity against the
official predictor for both orders: test_engine_fidelity.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from RetrievalSegLib.engine.sam2_memory import SUPPORT_ORDERS, Sam2MemoryEngine, frame_order

from _small_world import small_sam2_engine
from _fidelity import canonical, recording
from synthetic_slices import disc_slice

LABELS = (1, 2)
K = 3


@pytest.fixture(scope="module")
def engine() -> Sam2MemoryEngine:
    return small_sam2_engine()


@pytest.fixture(scope="module")
def case(engine):
    rng = np.random.default_rng(0)
    slices = [disc_slice(96, 80, shift=2.0 * i, rng=rng) for i in range(K + 1)]
    mems = [engine.encode_support(img, m, LABELS) for img, m in slices[:K]]  # most similar first
    return slices[K][0], mems


def _attention_inputs(engine, query, mems, order):
    with recording(engine.model) as rec:
        res = engine.query(query, mems, LABELS, support_order=order)
    att = canonical(rec, "engine", K, len(LABELS))
    return att, res


def _blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """[n * tokens, L, C] -> [n, tokens, L, C] (one block per frame)."""
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def test_frame_order_puts_the_most_similar_where_the_order_says():
    idx = np.array([[7, 8, 9], [1, 2, 3]])
    assert frame_order(idx, "nearest").tolist() == [[9, 8, 7], [3, 2, 1]]  # best at frame k-1
    assert frame_order(idx, "farthest").tolist() == [[7, 8, 9], [1, 2, 3]]  # best at frame 0
    assert SUPPORT_ORDERS[0] == "nearest"
    with pytest.raises(ValueError, match="support_order"):
        frame_order(idx, "closest")


def test_default_is_nearest(engine, case):
    query, mems = case
    default = engine.query(query, mems, LABELS)
    nearest = engine.query(query, mems, LABELS, support_order="nearest")
    assert np.array_equal(default.logits, nearest.logits)


def test_orders_give_identical_spatial_memories_and_different_pointer_encodings(engine, case):
    query, mems = case
    near, res_near = _attention_inputs(engine, query, mems, "nearest")
    far, res_far = _attention_inputs(engine, query, mems, "farthest")
    # spatial memories: the same k frames, in reverse frame order; every one at t_pos 0
    sp_near = _blocks(near["memory_attention.memory[spatial]"], K)
    sp_far = _blocks(far["memory_attention.memory[spatial]"], K)
    assert torch.equal(sp_near, sp_far.flip(0))
    assert not torch.equal(sp_near, sp_far)  # non-vacuous: the frames do differ
    assert torch.equal(near["memory_attention.memory_pos[spatial]"], far["memory_attention.memory_pos[spatial]"])
    # object pointers: the same k pointers (frames reversed) ...
    n_tok = near["memory_attention.num_obj_ptr_tokens"][0]
    assert n_tok == far["memory_attention.num_obj_ptr_tokens"][0] == 4 * K
    pn = _blocks(near["memory_attention.memory[obj_ptr]"], K)
    pf = _blocks(far["memory_attention.memory[obj_ptr]"], K)
    assert torch.allclose(pn, pf.flip(0))
    # ... but each support's pointer carries the encoding of another distance: the most similar
    # support's pointer is encoded as distance 1 (nearest) or K (farthest)
    posn = _blocks(near["memory_attention.memory_pos[obj_ptr]"], K)
    posf = _blocks(far["memory_attention.memory_pos[obj_ptr]"], K)
    assert torch.equal(posn, posf)  # encoding by frame position: the same table
    for j in range(K):  # support j (rank j) sits at frame K-1-j (nearest) and j (farthest)
        if K - 1 - j == j:
            continue  # the middle support of an odd k keeps its frame
        assert not torch.allclose(posn[K - 1 - j], posf[j]), f"support {j}: same pointer encoding in both orders"
    assert (res_near.object_score > 0).all() and (res_far.object_score > 0).all()
    assert not np.array_equal(res_near.logits, res_far.logits)
