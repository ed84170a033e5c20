{{/*
Names are fixed (not derived from the release name): the CRDs and the ClusterRoles are cluster-wide, so one
release per cluster, and the objects are named as deploy/ names them.
*/}}

{{/* The labels Helm's conventions add to every object; the only difference from deploy/'s objects. */}}
{{- define "runbook-operator.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The label deploy/ puts on the namespace, Deployment, pods and Service (and selects the pods by). */}}
{{- define "runbook-operator.nameLabel" -}}
app.kubernetes.io/name: runbook-operator
{{- end -}}

{{- define "runbook-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
The rules of the ClusterRole (or the Role, with .kind) .name in a file of files/ (symlinks to deploy/'s RBAC manifests, which hold the
reason of each rule as a comment): one source for the rules, whichever way the operator is installed.
*/}}
{{- define "runbook-operator.clusterRoleRules" -}}
{{- $rules := list -}}
{{- range $document := regexSplit "(?m)^---[ \\t]*$" (.root.Files.Get .path) -1 -}}
{{- $object := fromYaml $document -}}
{{- if and (eq ($object.kind | default "") ($.kind | default "ClusterRole")) (eq $object.metadata.name $.name) -}}
{{- $rules = $object.rules -}}
{{- end -}}
{{- end -}}
{{- if not $rules -}}
{{- fail (printf "%s has no %s %s with rules" .path (.kind | default "ClusterRole") .name) -}}
{{- end -}}
{{- toYaml $rules -}}
{{- end -}}
