"""A ROS 2 node: segments an image topic with the newest version of a model and follows its repository.

Subscribes to `input_topic` (sensor_msgs/Image, or CompressedImage with `compressed:=true`) and
publishes, each with the header (stamp, frame_id) of its input:
  <input_topic>/ciss/mask     sensor_msgs/Image, class ids (mono8, mono16 past 255 classes)
  <input_topic>/ciss/overlay  sensor_msgs/CompressedImage, JPEG of the coloured overlay with legend
  <input_topic>/ciss/classes  std_msgs/String, JSON class map (names, ids, colours, version), latched,
                              sent at start and on every hot swap
Parameters: repo (model repository folder), name (model), backend (auto, ort-cpu, ort-cuda, tensorrt,
...), input_topic, compressed, alpha.

    source /opt/ros/jazzy/setup.bash && pip install "ciss[ros]"
    python3 examples/ros2_node.py --ros-args -p repo:=/data/models -p name:=robot \\
        -p input_topic:=/camera/image_raw -p backend:=auto

The node is thin on purpose: message conversion (ciss.runtime.ros.to_bgr, mask_fields), the overlay
and the class map are the library code that tests/runtime/test_ros.py checks on bags without ROS;
rclpy itself cannot be installed from PyPI, so this file is not run by the tests.
"""

from __future__ import annotations

import json

import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ciss.runtime import Segmenter
from ciss.runtime.pipeline import annotate
from ciss.runtime.ros import classmap_record, jpeg, mask_fields, stamp_ns, to_bgr


class CissNode(Node):
    def __init__(self) -> None:
        super().__init__("ciss")
        repo = self.declare_parameter("repo", "models").value
        self.name = self.declare_parameter("name", "robot").value
        backend = self.declare_parameter("backend", "auto").value
        topic = self.declare_parameter("input_topic", "/camera/image_raw").value
        compressed = self.declare_parameter("compressed", False).value
        self.alpha = float(self.declare_parameter("alpha", 0.5).value)
        log = self.get_logger()
        self.segmenter = Segmenter.from_repository(repo, self.name, backend=backend, log=log.info,
                                                   on_error=lambda e: log.warning(str(e)))
        out = f"{topic.rstrip('/')}/ciss"
        self.mask_pub = self.create_publisher(Image, f"{out}/mask", 10)
        self.overlay_pub = self.create_publisher(CompressedImage, f"{out}/overlay", 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)  # late subscribers get it too
        self.classes_pub = self.create_publisher(String, f"{out}/classes", latched)
        # Sensor-data QoS keeps only the newest image while the model is busy: latest-frame semantics.
        self.create_subscription(CompressedImage if compressed else Image, topic, self.on_image, qos_profile_sensor_data)
        self.luts: dict = {}
        self.version: int | None = None

    def on_image(self, msg: Image | CompressedImage) -> None:
        image = to_bgr(msg)  # rclpy messages have the fields rosbags-image reads
        result = self.segmenter(image, stamp_ns(msg.header), msg.header.frame_id)
        if result.version != self.version:
            self.classes_pub.publish(String(data=json.dumps(classmap_record(result, self.name, self.version))))
            self.version = result.version
        fields = mask_fields(result.mask)
        self.mask_pub.publish(Image(header=msg.header, **{**fields, "data": fields["data"].tobytes()}))
        overlay = annotate(image, result, self.luts, None, result.timings["total"], self.alpha)
        self.overlay_pub.publish(CompressedImage(header=msg.header, format="jpeg", data=jpeg(overlay)))

    def destroy_node(self) -> None:
        self.segmenter.close()
        super().destroy_node()


def main() -> None:
    rclpy.init()
    node = CissNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
