"""The llmops operator, killed (as by SIGKILL: no cleanup, no status written) right after it
creates its Nth child object. Usage: crashing_operator.py NAMESPACE N"""

from __future__ import annotations

import os
import sys
from typing import Any

from llmops.cli import main
from llmops.controllers import kube

namespace, limit = sys.argv[1], int(sys.argv[2])
created = 0
original = kube.Kube.ensure


def ensure_then_die(self: kube.Kube, manifest: Any, *, update: bool = True) -> kube.Ensured:
    global created
    result = original(self, manifest, update=update)
    if result.created:
        created += 1
        if created >= limit:
            os._exit(137)
    return result


kube.Kube.ensure = ensure_then_die  # type: ignore[method-assign]
sys.exit(main(["operator", "--namespace", namespace, "--metrics-port", "0", "--health-port", "0"]))
