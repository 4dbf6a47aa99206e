"""Support shared by the tests, the demo, the benches and the vLLM harness: one polling
helper (`wait`) and the process-fleet helpers (`processes`) that start a router and
engines as child processes of the installed package, wait for them and stop them.

Nothing here is imported by the router itself.
"""
