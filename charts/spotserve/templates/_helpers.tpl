{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "spotserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name for the chart's objects. */}}
{{- define "spotserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "spotserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "spotserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "spotserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spotserve
{{ include "spotserve.selectorLabels" . }}
{{- end }}

{{/* The operator pod's identity; the NetworkPolicy admits it to the workers by these. */}}
{{- define "spotserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "spotserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spotserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spotserve.tokenSecretName" -}}
{{- default (printf "%s-token" (include "spotserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "spotserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "spotserve.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) }}
{{- end }}

{{/* Namespaces the NetworkPolicy goes into. */}}
{{- define "spotserve.policyNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson $namespaces }}
{{- end }}
