"""What each controller decides, as pure functions: spec + observed children + current status
-> desired children + new status + events. The kopf controllers and the local runtime call
the same functions, so a rule (restart, budget, deadline, failure message) exists once.

Nothing here talks to the Kubernetes API or starts a process: `observe` and `act` live in
the controllers (and, over local processes, in `llmops.local`).
"""
