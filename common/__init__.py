"""meterlink: smart-metering gateway and head-end; shared primitives only, never I/O."""
