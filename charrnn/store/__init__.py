"""The store room: its modules moved here as they were; what it holds and may import is said in the next commit."""
