"""dpstack: a real-time control stack for robot diffusion policies.

The top-level folders of the repository install as subpackages of this one:
`dpstack.core` (the shared vocabulary), `dpstack.data`, `dpstack.policy`,
`dpstack.runtime`, `dpstack.sim`, `dpstack.deploy`, and `dpstack.demo`.
"""
__version__ = "0.1.0"
