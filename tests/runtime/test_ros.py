"""ROS recordings in and out (the `ros` extra): bags written here with rosbags from synthetic frames in
both ROS 2 formats and ROS 1, segmented by `ciss live`, its MCAP output read back, and a Foxglove client."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rosbags.image", reason="needs the ros extra: pip install -e '.[ros]'")
pytest.importorskip("foxglove", reason="needs the ros extra: pip install -e '.[ros]'")

from conftest import CISS, REPO  # noqa: E402
from PIL import Image  # noqa: E402
from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag1 import Writer as Writer1  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer as Writer2  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402
from tiny_models import NAME, Exported, SwapAtRead, exported, publish  # noqa: E402

from ciss.errors import CissError  # noqa: E402
from ciss.runtime.foxglove_server import FoxgloveSink, parse_address  # noqa: E402
from ciss.runtime.pipeline import LiveOptions, run_live  # noqa: E402
from ciss.runtime.ros import BagSink, RecordingSource, mask_message, to_bgr, typestore  # noqa: E402
from ciss.runtime.segmenter import Segmenter  # noqa: E402
from ciss.runtime.sources import open_source  # noqa: E402
from ciss.synthetic import SyntheticStream  # noqa: E402

TOPIC = "/camera/image_raw"
T0 = 1_700_000_000 * 10**9 + 123_456_789  # header stamps, 40 ms apart
STEP = 40_000_000


def frames(n: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    stream = SyntheticStream(*size, seed=1, things=4)
    return [stream.read()[0] for _ in range(n)]


def image_msg(store, image: np.ndarray, i: int, encoding: str = "bgr8", compressed: str | None = None):
    """Frame `i` as sensor_msgs Image in `encoding`, or CompressedImage in `compressed` (jpeg, png)."""
    stamp = T0 + i * STEP
    Time, Header = store.types["builtin_interfaces/msg/Time"], store.types["std_msgs/msg/Header"]
    head = (Header(i, Time(stamp // 10**9, stamp % 10**9), f"cam{i % 2}") if "seq" in Header.__dataclass_fields__
            else Header(Time(stamp // 10**9, stamp % 10**9), f"cam{i % 2}"))
    if compressed:
        data = cv2.imencode(f".{compressed}", image)[1].reshape(-1)
        return store.types["sensor_msgs/msg/CompressedImage"](head, compressed, data)
    pixels = {"bgr8": image, "rgb8": image[..., ::-1], "mono8": cv2.cvtColor(image, cv2.COLOR_BGR2GRAY),
              "bayer_rggb8": bayer_rggb(image)}[encoding]
    h, w = pixels.shape[:2]
    data = np.ascontiguousarray(pixels).reshape(-1)
    return store.types["sensor_msgs/msg/Image"](head, h, w, encoding, 0, data.size // h, data)


def bayer_rggb(image: np.ndarray) -> np.ndarray:
    out = np.empty(image.shape[:2], np.uint8)
    out[0::2, 0::2], out[0::2, 1::2] = image[0::2, 0::2, 2], image[0::2, 1::2, 1]
    out[1::2, 0::2], out[1::2, 1::2] = image[1::2, 0::2, 1], image[1::2, 1::2, 0]
    return out


def write_bag(path: Path, images: list[np.ndarray], fmt: str = "mcap", topics: tuple[str, ...] = (TOPIC,),
              **kwargs) -> Path:
    """A bag in `fmt` (mcap, db3: ROS 2; bag: ROS 1) with `images` on each topic, recorded 40 ms apart;
    returns what to give --source (the .mcap/.db3 file inside a ROS 2 bag folder)."""
    msgtype = "sensor_msgs/msg/CompressedImage" if kwargs.get("compressed") else "sensor_msgs/msg/Image"
    if fmt == "bag":
        store = get_typestore(Stores.ROS1_NOETIC)
        with Writer1(path) as writer:
            conns = [writer.add_connection(t, msgtype, typestore=store) for t in topics]
            for i, image in enumerate(images):
                for c in conns:
                    writer.write(c, T0 + i * STEP, store.serialize_ros1(image_msg(store, image, i, **kwargs), msgtype))
        return path
    store = get_typestore(Stores.LATEST)
    plugin = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
    with Writer2(path, version=9, storage_plugin=plugin) as writer:
        conns = [writer.add_connection(t, msgtype, typestore=store) for t in topics]
        for i, image in enumerate(images):
            for c in conns:
                writer.write(c, T0 + i * STEP, store.serialize_cdr(image_msg(store, image, i, **kwargs), msgtype))
    return path / f"{path.name}.{fmt}"


def read_bag(path: Path) -> list[tuple[str, int, object]]:
    with AnyReader([path]) as reader:
        return [(c.topic, t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


# --- message conversion ---------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,compressed", [("bgr8", None), ("rgb8", None), ("mono8", None),
                                                 ("bayer_rggb8", None), ("bgr8", "png"), ("bgr8", "jpg")])
def test_image_messages_become_bgr_frames(encoding: str, compressed: str | None):
    image = frames(1)[0]
    bgr = to_bgr(image_msg(typestore(), image, 0, encoding, compressed))
    assert bgr.shape == image.shape and bgr.dtype == np.uint8 and bgr.flags.c_contiguous
    if encoding in ("bgr8", "rgb8") and compressed != "jpg":
        assert np.array_equal(bgr, image)
    elif encoding == "mono8":
        assert np.array_equal(bgr[..., 0], cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    else:  # demosaicing and JPEG are lossy
        assert np.abs(bgr.astype(int) - image).mean() < 40


def test_an_unsupported_encoding_is_a_one_line_error():
    msg = image_msg(typestore(), frames(1)[0], 0)
    msg.encoding = "weird42"
    with pytest.raises(CissError, match="'weird42' image"):
        to_bgr(msg)


@pytest.mark.parametrize("dtype,encoding", [(np.uint8, "mono8"), (np.uint16, "mono16")])
def test_masks_round_trip_through_image_messages(dtype, encoding: str):
    store = typestore()
    mask = np.random.default_rng(0).integers(0, 300 if dtype == np.uint16 else 7, (5, 9)).astype(dtype)
    msg = mask_message(store, mask, T0, "cam")
    back = store.deserialize_cdr(store.serialize_cdr(msg, "sensor_msgs/msg/Image"), "sensor_msgs/msg/Image")
    assert back.encoding == encoding and back.header.stamp.sec == T0 // 10**9 and back.header.frame_id == "cam"
    assert np.array_equal(np.frombuffer(back.data.tobytes(), dtype).reshape(5, 9), mask)


# --- recordings as a source -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mcap", "db3", "bag"])
def test_every_message_is_read_once_in_order_with_its_stamp_and_frame_id(tmp_path: Path, fmt: str):
    images = frames(6)
    source_path = write_bag(tmp_path / f"in.{fmt}" if fmt == "bag" else tmp_path / "in", images, fmt)
    with open_source(str(source_path)) as source:
        assert source.topic == TOPIC and "6 Image messages" in source.describe()
        got = list(iter(source.read, None))
    assert [f.index for f in got] == list(range(6)) and source.stats["dropped"] == 0
    assert [f.stamp for f in got] == [T0 + i * STEP for i in range(6)]
    assert [f.frame_id for f in got] == [f"cam{i % 2}" for i in range(6)]
    assert all(np.array_equal(f.image, im) for f, im in zip(got, images, strict=True))


def test_a_ros2_bag_folder_and_a_folder_of_ros1_bags_are_recordings(tmp_path: Path):
    images = frames(4)
    folder = write_bag(tmp_path / "ros2", images, "mcap").parent
    with RecordingSource(folder) as source:
        assert len(list(iter(source.read, None))) == 4
    (tmp_path / "ros1").mkdir()
    write_bag(tmp_path / "ros1" / "a.bag", images[:2], "bag")
    with RecordingSource(tmp_path / "ros1") as source:
        assert [f.stamp for f in iter(source.read, None)] == [T0, T0 + STEP]


def test_several_image_topics_are_listed_in_one_line(tmp_path: Path):
    path = write_bag(tmp_path / "in", frames(2), topics=(TOPIC, "/camera/left"))
    with pytest.raises(CissError) as e:
        RecordingSource(path)
    assert str(e.value).count("\n") == 0 and "choose one with --topic" in str(e.value)
    assert f"{TOPIC} (sensor_msgs/msg/Image, 2 messages)" in str(e.value) and "/camera/left" in str(e.value)
    with pytest.raises(CissError, match="no image topic /nope"):
        RecordingSource(path, "/nope")
    with RecordingSource(path, "/camera/left") as source:
        assert source.read().stamp == T0


def test_realtime_keeps_the_newest_due_message_and_counts_the_rest(tmp_path: Path):
    path = write_bag(tmp_path / "in", frames(25), compressed="jpg")  # 1 s at 25 Hz
    with RecordingSource(path, realtime=True) as source:
        started, got = time.monotonic(), []
        while (frame := source.read()) is not None:
            got.append(frame.index)
            time.sleep(0.1)  # a model at 10 FPS behind a 25 Hz camera
    assert 0.9 < time.monotonic() - started < 2.0
    assert 6 <= len(got) <= 13 and got == sorted(got) and source.stats["dropped"] == 25 - len(got)


# --- results as a recording -----------------------------------------------------------------------

def test_a_swap_mid_bag_is_recorded_at_the_stamp_of_its_first_frame(models: Exported, tmp_path: Path):
    path = write_bag(tmp_path / "in", frames(12), "mcap")
    repo = tmp_path / "models"
    publish(repo, models.v1)
    segmenter = Segmenter.from_repository(repo, NAME, poll_s=0.05, log=lambda s: None)
    with segmenter, open_source(str(path)) as source, BagSink(tmp_path / "out.mcap", source.topic, NAME) as bag:
        swapping = SwapAtRead(source, 5, lambda: publish(repo, models.v2), segmenter.wait_for_pending)
        report = run_live(swapping, segmenter, LiveOptions(save_masks=tmp_path / "masks"), log=lambda s: None,
                          sinks=[bag])
    assert report["frames"] == 12 and report["versions"] == [1, 2]
    out = read_bag(tmp_path / "out.mcap")
    by_topic = {t: [(s, m) for topic, s, m in out if topic == t] for t in {o[0] for o in out}}
    stamps = [T0 + i * STEP for i in range(12)]
    for kind in ("mask", "overlay"):
        msgs = by_topic[f"{TOPIC}/ciss/{kind}"]
        assert [s for s, _ in msgs] == stamps  # every frame once, logged at its input's stamp
        assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in msgs] == stamps
        assert [m.header.frame_id for _, m in msgs] == [f"cam{i % 2}" for i in range(12)]
    for i, (_, m) in enumerate(by_topic[f"{TOPIC}/ciss/mask"]):
        with Image.open(tmp_path / "masks" / f"{i:06d}.png") as file:
            png = np.array(file)
        assert m.encoding == "mono8" and np.array_equal(m.data.reshape(m.height, m.width), png)
    classes = [(s, json.loads(m.data)) for s, m in by_topic[f"{TOPIC}/ciss/classes"]]
    assert [(s, c["version"], c["previous"]) for s, c in classes] == [(stamps[0], 1, None), (stamps[5], 2, 1)]
    assert classes[1][1]["new_classes"] == ["water", "sand"] and classes[1][1]["model"] == NAME
    assert [c["name"] for c in classes[1][1]["classes"]][-2:] == ["water", "sand"]


def test_cli_segments_each_bag_format_and_keeps_stamps(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    for fmt in ("mcap", "db3", "bag"):
        path = write_bag(tmp_path / f"in-{fmt}.bag" if fmt == "bag" else tmp_path / f"in-{fmt}", frames(5), fmt)
        out, stats = tmp_path / f"out-{fmt}.mcap", tmp_path / f"stats-{fmt}.jsonl"
        run = subprocess.run([*CISS, "live", "--source", str(path), "--topic", TOPIC, "--repo", str(repo), "--name",
                              NAME, "--headless", "--save-bag", str(out), "--stats", str(stats)],
                             cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
        assert "5 frames" in run.stdout and f"bag: 5 frames to {out}" in run.stdout
        records = [json.loads(line) for line in stats.read_text().splitlines()]
        assert [(r["stamp"], r["frame_id"]) for r in records] == [(T0 + i * STEP, f"cam{i % 2}") for i in range(5)]
        masks = [s for t, s, _ in read_bag(out) if t == f"{TOPIC}/ciss/mask"]
        assert masks == [T0 + i * STEP for i in range(5)]


@pytest.mark.parametrize("args", [["--source", "in.mcap"], ["--source", "synthetic", "--save-bag", "out.mcap"],
                                  ["--source", "synthetic", "--foxglove"]])
def test_without_the_extra_each_ros_option_says_how_to_install_it(tmp_path: Path, args: list[str]):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['rosbags'] = sys.modules['foxglove'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    run = subprocess.run([*CISS, "live", *args, "--headless"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 2 and run.stderr.strip().endswith('needs the ros extra: pip install "ciss[ros]"'), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_cli_lists_image_topics_and_exits_2_before_loading_a_model(tmp_path: Path):
    path = write_bag(tmp_path / "in", frames(2), topics=(TOPIC, "/camera/left"))
    run = subprocess.run([*CISS, "live", "--source", str(path), "--headless"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith("error: ") and "/camera/left (sensor_msgs/msg/Image" in lines[-1]


def test_a_killed_run_leaves_every_complete_frame_readable(models: Exported, tmp_path: Path):
    """SIGKILL: no close, no index. Each frame's messages end a flushed MCAP chunk, so a linear read finds them."""
    mcap_reader = pytest.importorskip("mcap.reader", reason="the kill test reads with the mcap package (dev extra)")
    repo = tmp_path / "models"
    publish(repo, models.v1)
    out, stats = tmp_path / "out.mcap", tmp_path / "stats.jsonl"
    process = subprocess.Popen([*CISS, "live", "--source", "synthetic", "--fps", "50", "--repo", str(repo), "--name",
                                NAME, "--headless", "--save-bag", str(out), "--stats", str(stats)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not stats.exists() or len(stats.read_text().splitlines()) < 11) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    # A frame's stats line is written before its bag messages, so the kill may land between the two for the last one.
    written = len(stats.read_text().splitlines())
    store, masks = typestore(), []
    with out.open("rb") as f:
        try:
            for _, channel, message in mcap_reader.NonSeekingReader(f).iter_messages(log_time_order=False):
                if channel.topic == "/ciss/mask":
                    masks.append(store.deserialize_cdr(message.data, "sensor_msgs/msg/Image"))
        except Exception as e:  # noqa: BLE001 - the end of a killed file: a truncated chunk, or no footer
            assert type(e).__name__ in ("EndOfFile", "RecordLengthLimitExceeded", "InvalidMagic"), e
    assert written - 1 <= len(masks) <= written and len(masks) >= 10
    assert all(m.height == 240 and m.width == 320 for m in masks)


# --- the live Foxglove view -----------------------------------------------------------------------

def test_foxglove_addresses():
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address(":9000") == ("127.0.0.1", 9000) and parse_address("0.0.0.0") == ("0.0.0.0", 8765)
    with pytest.raises(CissError, match="HOST:PORT"):
        parse_address("localhost:port")


class WebSocketClient:
    """Just enough of RFC 6455 and the Foxglove WebSocket protocol to subscribe and read messages."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: foxglove.sdk.v1\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "server closed the connection"
            data += chunk
        return data

    def receive(self) -> str | bytes:
        head = self._exact(2)
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._exact(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._exact(8))[0]
        payload = self._exact(length)
        return payload.decode() if opcode == 1 else payload

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        head = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", len(data)))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def test_a_foxglove_client_on_loopback_receives_frames_and_a_swap_event(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    segmenter = Segmenter.from_repository(repo, NAME, poll_s=0.05, log=lambda s: None)
    with segmenter, FoxgloveSink("127.0.0.1:0", NAME, log=lambda s: None) as view:
        assert view.host == "127.0.0.1" and view.port > 0
        client = WebSocketClient(view.port)
        channels: dict[int, str] = {}
        while len(channels) < 5:
            message = client.receive()
            if isinstance(message, str) and json.loads(message)["op"] == "advertise":
                channels |= {c["id"]: c["topic"] for c in json.loads(message)["channels"]}
        client.send(json.dumps({"op": "subscribe", "subscriptions": [{"id": i, "channelId": c} for i, c in
                                                                   enumerate(channels)]}))
        topic_of = dict(enumerate(channels.values()))
        time.sleep(0.5)  # the subscription reaches the server
        options = LiveOptions(stats=tmp_path / "stats.jsonl")
        with open_source(str(write_bag(tmp_path / "in", frames(6)))) as source:
            swapping = SwapAtRead(source, 3, lambda: publish(repo, models.v2), segmenter.wait_for_pending)
            run_live(swapping, segmenter, options, log=lambda s: None, sinks=[view])
        got: dict[str, list[bytes]] = {}
        client.sock.settimeout(5)
        while any(len(got.get(f"/ciss/{t}", [])) < 6 for t in ("overlay", "mask", "stats")) or "/ciss/swaps" not in got:
            message = client.receive()
            if isinstance(message, bytes) and message[:1] == b"\x01":  # MessageData: subscription, log time, payload
                subscription, log_time = struct.unpack_from("<IQ", message, 1)
                got.setdefault(topic_of[subscription], []).append(message[13:])
    assert b"\xff\xd8\xff" in got["/ciss/overlay"][0]  # a foxglove.CompressedImage holding a JPEG
    assert len(got["/ciss/overlay"]) == len(got["/ciss/mask"]) == 6
    (swap,) = [json.loads(m) for m in got["/ciss/swaps"]]
    assert swap["old"] == 1 and swap["new"] == 2 and swap["classes_added"] == ["water", "sand"]
    assert swap["stamp"] == T0 + 3 * STEP
    stats = [json.loads(m) for m in got["/ciss/stats"]]
    assert [s["stamp"] for s in stats] == [T0 + i * STEP for i in range(6)]
