{{/*
What the operator does, verb by verb (tests/cluster/test_security.py runs the controllers
with exactly these rules):
- kopf: list/watch the kinds, patch them (taking off the finalizer earlier versions put)
  and their status; create Events on them.
- sweeps: create the trial TrainingRuns (server-side apply) and patch their spec.suspend.
- controllers: read the kinds they reference (a TrainingRun's Dataset, a ModelDeployment's
  TrainingRun, a ModelDeployment's TrainingSchedule); create and delete the TrainingRuns
  of a TrainingSchedule; get + create + patch (server-side apply) every child; list and delete Jobs
  (stale Dataset versions, gang restarts); list Pods and read rank 0's log; delete the
  autoscaler kind not in use; read Kueue's Workloads (why a queued gang waits) and patch
  their spec.active (how a Kueue-managed gang is suspended and resumed).
- the watch cache: list/watch every kind it reads (children and Pods), so that reconciles
  read from memory instead of the API server.
*/}}
{{- define "llmops.rules" -}}
- apiGroups: ["llmops.dev"]
  resources: ["datasets", "trainingruns", "modeldeployments", "trainingschedules", "sweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llmops.dev"]
  resources: ["datasets/status", "trainingruns/status", "modeldeployments/status", "trainingschedules/status", "sweeps/status"]
  verbs: ["patch"]
- apiGroups: ["llmops.dev"]
  resources: ["trainingruns"]
  verbs: ["create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  # list, watch: a Job's FailedCreate events say why its pods do not exist (watched with a
  # field selector on that reason)
  verbs: ["create", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps", "services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end -}}
