"""How image arrays are stored: chunking and compression actually applied, frames exact."""
import json

import numpy as np

from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.data.replay_buffer import IMAGE_CHUNK_BYTES, DatasetAttrs, ReplayBuffer

SIZE = 84


def _frames(T, t0):
    """Smooth frames with a square moving across them, like a camera's (not noise)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img = np.zeros((T, SIZE, SIZE, 3), dtype=np.uint8)
    img[..., 0] = (x * 2)[None]
    img[..., 1] = (y * 2)[None]
    for i in range(T):
        p = (t0 + i) % (SIZE - 10)
        img[i, p:p + 10, p:p + 10] = (200, 30, 30)
    return img


def _zarray(path, key):
    return json.loads((path / "data" / key / ".zarray").read_text())


def test_image_arrays_are_chunked_and_zstd_compressed(tmp_path):
    spec = RobotSpec("lift", "Panda", 20.0, (ArraySpec("agentview_image", (SIZE, SIZE, 3), "uint8"),
                                              ArraySpec("robot0_eef_pos", (3,))), ActionSpec(shape=(7,)))
    path = tmp_path / "img.zarr"
    rb = ReplayBuffer.create(path, DatasetAttrs("lift", 20.0, spec, "scripted_expert"))
    episodes = [_frames(30, 30 * e) for e in range(4)]  # 120 frames: episodes straddle chunk edges
    for img in episodes:
        rb.add_episode({"agentview_image": img, "robot0_eef_pos": np.zeros((30, 3)), "action": np.zeros((30, 7))})

    meta = _zarray(path, "agentview_image")
    frame = SIZE * SIZE * 3
    assert meta["compressor"] == {"id": "zstd", "level": 3}
    assert meta["chunks"] == [IMAGE_CHUNK_BYTES // frame, SIZE, SIZE, 3] == [49, SIZE, SIZE, 3]
    assert _zarray(path, "robot0_eef_pos")["compressor"]["id"] == "blosc"  # low-dim keys keep theirs

    stored = sum(f.stat().st_size for f in (path / "data" / "agentview_image").iterdir() if f.name[0] != ".")
    assert stored * 5 < 120 * frame  # camera-like frames shrink by well over 5x

    again = ReplayBuffer.open(path)
    for e, img in enumerate(episodes):
        np.testing.assert_array_equal(again.get_episode(e)["agentview_image"], img)
