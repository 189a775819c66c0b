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
