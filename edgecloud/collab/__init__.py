"""The device–cloud collaboration core: framed typed messages over TCP, a link emulator, a message trace."""
