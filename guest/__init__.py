"""What runs inside the microVM (the agent) and the wire protocol both ends share.

Only the standard library, pyzmq and jupyter_client may be imported at module level
by ``agent``, ``protocol`` and ``files``: they run on the guest's Python."""
