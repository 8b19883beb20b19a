"""What a process runs on: host CPU devices and the device mesh."""
