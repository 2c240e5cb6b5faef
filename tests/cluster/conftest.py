"""The real node for the tests of this package only: started by the first test that asks for
it and torn down (with the check that the host is clean) when the package's tests are done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from niphas_cluster.images import NIPHAS_IMAGE
from niphas_cluster.node import Node
from tests.node_harness import Kubectl, node_kubectl_for, running_node


@pytest.fixture(scope="package")
def real_node() -> Iterator[Node]:
    with running_node() as node:
        yield node


@pytest.fixture(scope="package")
def node_kubectl(real_node: Node) -> Kubectl:
    return node_kubectl_for(real_node)


@pytest.fixture(scope="package")
def niphas_image() -> str:
    """The platform's image (built at collection by scripts/build-image.sh); the node imports
    it when it starts."""
    return NIPHAS_IMAGE
