"""OpenAI-compatible serving: socket-free app core, HTTP transport, upstream proxy, wire format, batching."""
