"""Ids txmon makes itself (when the main app does not send one)."""
import secrets


def new_verification_id() -> str:
    """A random verification id within the contract's id alphabet."""
    return "ver_" + secrets.token_hex(12)
