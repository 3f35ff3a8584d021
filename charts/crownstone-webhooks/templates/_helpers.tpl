{{- define "crownstone-webhooks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "crownstone-webhooks.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "crownstone-webhooks.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "crownstone-webhooks.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "crownstone-webhooks.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crownstone-webhooks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "crownstone-webhooks.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "crownstone-webhooks.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: crownstone-webhooks
{{- end }}

{{- define "crownstone-webhooks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crownstone-webhooks.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace of the REST API's resources. */}}
{{- define "crownstone-webhooks.apiNamespace" -}}
{{- .Values.apiNamespace | default .Values.watchNamespace | default .Release.Namespace }}
{{- end }}

{{- define "crownstone-webhooks.adminSecretName" -}}
{{- .Values.adminKey.existingSecret | default (printf "%s-admin" (include "crownstone-webhooks.fullname" .)) }}
{{- end }}

{{- define "crownstone-webhooks.adminSecretKey" -}}
{{- if .Values.adminKey.existingSecret }}{{ .Values.adminKey.existingSecretKey }}{{ else }}adminKey{{ end }}
{{- end }}

{{/* What the operator may do with the resources of one namespace, or all. */}}
{{- define "crownstone-webhooks.rules" -}}
- apiGroups: [webhooks.crownstone.rocks]
  resources: [listeners, webhookusers]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [webhooks.crownstone.rocks]
  resources: [listeners/status, webhookusers/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
