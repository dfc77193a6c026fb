"""Write a video as a ROS recording, to try `ciss live --source x.mcap` without a robot (needs ciss[ros]).

Each frame becomes a sensor_msgs/Image (bgr8), or with --jpeg a CompressedImage, on --topic, its
header stamped at the video's frame rate from --start (seconds since the epoch; default now).
A .bag output is a ROS 1 bag; anything else a ROS 2 bag folder holding <name>/<name>.mcap.

    python examples/video_to_bag.py clip.mp4 /tmp/clip --topic /camera/image_raw
    ciss live --source /tmp/clip/clip.mcap --topic /camera/image_raw --save-bag /tmp/out.mcap --headless
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer as Writer2
from rosbags.typesys import Stores, get_typestore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", type=Path)
    ap.add_argument("out", type=Path, help="a .bag file (ROS 1) or a new folder (ROS 2, MCAP)")
    ap.add_argument("--topic", default="/camera/image_raw")
    ap.add_argument("--frame-id", default="camera")
    ap.add_argument("--jpeg", action="store_true", help="sensor_msgs/CompressedImage instead of Image")
    ap.add_argument("--start", type=float, default=time.time(), help="stamp of the first frame, epoch seconds")
    args = ap.parse_args()

    ros1 = args.out.suffix == ".bag"
    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.LATEST)
    msgtype = "sensor_msgs/msg/CompressedImage" if args.jpeg else "sensor_msgs/msg/Image"
    Time, Header = store.types["builtin_interfaces/msg/Time"], store.types["std_msgs/msg/Header"]
    cap = cv2.VideoCapture(str(args.video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    writer = Writer1(args.out) if ros1 else Writer2(args.out, version=9, storage_plugin=StoragePlugin.MCAP)
    n = 0
    with writer:
        connection = writer.add_connection(args.topic, msgtype, typestore=store)
        while (frame := cap.read()[1]) is not None:
            stamp = int(args.start * 1e9) + round(n * 1e9 / fps)
            when = Time(stamp // 1_000_000_000, stamp % 1_000_000_000)
            header = Header(n, when, args.frame_id) if ros1 else Header(when, args.frame_id)
            if args.jpeg:
                msg = store.types[msgtype](header, "jpeg", cv2.imencode(".jpg", frame)[1].reshape(-1))
            else:
                h, w = frame.shape[:2]
                msg = store.types[msgtype](header, h, w, "bgr8", 0, 3 * w, np.ascontiguousarray(frame).reshape(-1))
            data = store.serialize_ros1(msg, msgtype) if ros1 else store.serialize_cdr(msg, msgtype)
            writer.write(connection, stamp, data)
            n += 1
    where = args.out if ros1 else args.out / f"{args.out.name}.mcap"
    print(f"{n} frames at {fps:g} fps on {args.topic} ({msgtype}) in {where}")


if __name__ == "__main__":
    main()
