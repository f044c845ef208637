class ModuleDocFragment:
    """The options every tccdeploy.tccp module shares: which TC, and the engine's identity."""

    DOCUMENTATION = r"""
options:
  tc_url:
    description:
      - The served trusted coordinator (C(tccdeploy tc serve)), an https URL.
      - Defaults to C($TCCDEPLOY_TC).
    type: str
  engine_dir:
    description:
      - The folder with this engine's client certificate and key for the TC.
      - Defaults to C($TCCDEPLOY_ENGINE_DIR), else C(STATE/engine).
    type: path
  state:
    description:
      - tccdeploy's state folder on the controller (the engine's own known_hosts).
      - Defaults to C($TCCDEPLOY_STATE), else tccdeploy's default.
    type: path
requirements:
  - tccdeploy installed in the Python that runs ansible-core on the controller.
notes:
  - Runs on the controller through an action plugin; the node is reached over SSH by
    tccdeploy's engine with strict host-key checking, as C(tccdeploy apply) reaches it.
  - Supports check mode and diff mode as C(tccdeploy apply) does.
  - Returns C(changed), and on a refusal C(failed), C(msg) and C(reason) (the TC's or the
    engine's reason code).
"""
