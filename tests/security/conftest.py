"""The attacks of issue 10 (an outside adversarial run), each replayed against kiln.

Fixtures come from the package conftests they share (busybox stores, the runtime probe)."""

from tests.builder.conftest import broot, kb  # noqa: F401
from tests.runtime.conftest import krun, probe_rootfs, run_root  # noqa: F401
