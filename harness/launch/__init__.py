"""Launchers: one ``Worker`` per rank, driven from the harness process."""

from harness.launch.base import Launcher, WorkerError
from harness.launch.mp import MpLauncher
from harness.launch.ray_launcher import RayLauncher
from harness.launch.worker import Worker

__all__ = ["Launcher", "MpLauncher", "RayLauncher", "Worker", "WorkerError"]
