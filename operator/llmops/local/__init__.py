"""The local runtime: runs the pod templates the operator's builders produce as processes on
this machine (`llmops run -f`), with the same command, args and environment as on a cluster.

Nothing here knows what the workloads do: the differences from a cluster are confined to the
translation of a pod (volumes to folders, cluster DNS to loopback, container ports to free
local ports) and to the controllers' status logic replayed over local processes.
"""
