{{- define "tensor-wasm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tensor-wasm.labels" -}}
app.kubernetes.io/name: tensor-wasm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tensor-wasm.selector" -}}
app.kubernetes.io/name: tensor-wasm
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tensor-wasm.image" -}}
{{- $tag := .Values.image.tag | default (ternary .Chart.AppVersion (printf "%s-cuda" .Chart.AppVersion) (eq .Values.mode "cpu")) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "tensor-wasm.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "tensor-wasm.fullname" .)) -}}
{{- end -}}

{{/* The extended resource one executor holds. */}}
{{- define "tensor-wasm.deviceResource" -}}
{{- if eq .Values.mode "mig" -}}
{{- printf "nvidia.com/mig-%s" .Values.executor.migProfile -}}
{{- else -}}
nvidia.com/gpu
{{- end -}}
{{- end -}}

{{/* Where the proxies keep their placement table: etcd://… when they share
one in etcd (every member of the chart's etcd, or etcd.endpoints), empty
for the file in the proxy's state directory. */}}
{{- define "tensor-wasm.placement" -}}
{{- $prefix := printf "/%s" (trimAll "/" .Values.etcd.prefix) -}}
{{- if .Values.etcd.enabled -}}
{{- $fullname := include "tensor-wasm.fullname" . -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $members = append $members (printf "%s-etcd-%d.%s-etcd-peers.%s.svc.%s:2379" $fullname $i $fullname $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- printf "etcd://%s%s" (join "," $members) $prefix -}}
{{- else if .Values.etcd.endpoints -}}
{{- printf "%s://%s%s" (ternary "etcds" "etcd" .Values.etcd.tls.enabled) (join "," .Values.etcd.endpoints) $prefix -}}
{{- end -}}
{{- end -}}

{{/* Settings that cannot work together fail the render. */}}
{{- define "tensor-wasm.validate" -}}
{{- $replicas := int .Values.proxy.replicas -}}
{{- if lt $replicas 1 -}}
{{- fail "proxy.replicas: at least 1" -}}
{{- end -}}
{{- if and .Values.etcd.enabled .Values.etcd.endpoints -}}
{{- fail "etcd.enabled and etcd.endpoints: choose one, the chart's etcd or yours" -}}
{{- end -}}
{{- if and (gt $replicas 1) (not (include "tensor-wasm.placement" .)) -}}
{{- fail (printf "proxy.replicas=%d needs the placement table in etcd: set etcd.enabled=true (an etcd of this chart) or etcd.endpoints (yours). With the table in a file there is exactly one proxy (docs/DEPLOYMENT.md, \"More than one proxy on Kubernetes\")" $replicas) -}}
{{- end -}}
{{- if and .Values.etcd.enabled (not (has (int .Values.etcd.replicas) (list 1 3 5 7))) -}}
{{- fail "etcd.replicas: 1, 3, 5 or 7 members" -}}
{{- end -}}
{{- if and .Values.etcd.enabled (or .Values.etcd.tls.enabled .Values.etcd.auth.user) -}}
{{- fail "etcd.tls and etcd.auth are for etcd.endpoints: the chart's etcd runs without them, reached only by the proxies (NetworkPolicy)" -}}
{{- end -}}
{{- range .Values.etcd.endpoints -}}
{{- if or (contains "://" .) (contains "/" .) (not (regexMatch ":[0-9]+$" .)) -}}
{{- fail (printf "etcd.endpoints: %q is not host:port (TLS: etcd.tls.enabled)" .) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.etcd.auth.user (not (or .Values.etcd.auth.passwordSecret .Values.secrets.existingSecret .Values.secrets.etcdPassword)) -}}
{{- $old := (lookup "v1" "Secret" .Release.Namespace (include "tensor-wasm.secretName" .)).data | default dict -}}
{{- if not (hasKey $old "etcd-password") -}}
{{- fail "etcd.auth.user needs its password: secrets.etcdPassword, or etcd.auth.passwordSecret" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One proxy's share of a fleet-wide rate: qps / replicas (fractional). */}}
{{- define "tensor-wasm.perProxyQps" -}}
{{- $n := int .replicas -}}
{{- if eq $n 1 -}}{{ .qps }}{{- else -}}{{ divf .qps $n }}{{- end -}}
{{- end -}}

{{/* One proxy's share of a fleet-wide burst: ⌈burst / replicas⌉, at least 1. */}}
{{- define "tensor-wasm.perProxyBurst" -}}
{{- max 1 (int (ceil (divf .burst (int .replicas)))) -}}
{{- end -}}
