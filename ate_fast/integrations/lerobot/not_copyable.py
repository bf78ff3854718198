"""What a patch leaves on a policy refuses to be copied or pickled with it.

A patch's methods are closures over the original model (its sampler, its Steer): a deep
copy of the policy would run the original's methods and train the original's weights,
and a pickled one could not be rebuilt. Both are refused with what works instead.
"""

from __future__ import annotations

from typing import Any

from ate_fast.errors import InvalidArgumentError


class NotCopyable:
    """A base whose instances raise on ``copy.deepcopy`` and on pickling."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise InvalidArgumentError(
            "policy: a policy patched by ate_fast cannot be deep-copied (the copy would run "
            "the original's patched methods and weights); copy it before patching, or "
            "remove() the patch, copy, and patch each policy on its own"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise InvalidArgumentError(
            "policy: a policy patched by ate_fast cannot be pickled (torch.save(policy)); "
            "save_pretrained() and state_dict() work while patched (a patch changes no "
            "weight or config), or remove() the patch first"
        )
