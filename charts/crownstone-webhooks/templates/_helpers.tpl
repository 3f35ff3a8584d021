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

{{/* The namespaces listed to watch, as JSON: watchNamespaces, else the deprecated
watchNamespace, else the release namespace. */}}
{{- define "crownstone-webhooks.listedNamespaces" -}}
{{- $list := .Values.watchNamespaces | default list }}
{{- if and (not $list) .Values.watchNamespace }}{{ $list = list .Values.watchNamespace }}{{ end }}
{{- if not $list }}{{ $list = list .Release.Namespace }}{{ end }}
{{- toJson (uniq $list) }}
{{- end }}

{{/* The namespace of the REST API's resources. */}}
{{- define "crownstone-webhooks.apiNamespace" -}}
{{- .Values.apiNamespace | default (first (include "crownstone-webhooks.listedNamespaces" . | fromJsonArray)) }}
{{- end }}

{{/* Whether the pod serves the REST API. */}}
{{- define "crownstone-webhooks.servesApi" -}}
{{- if ne .Values.mode "controller" }}true{{ end }}
{{- end }}

{{/* The namespaces the operator makes Secrets in, each with a Role, as JSON: the listed ones
and, when the REST API is served, its namespace, which is then watched too. */}}
{{- define "crownstone-webhooks.roleNamespaces" -}}
{{- $list := include "crownstone-webhooks.listedNamespaces" . | fromJsonArray }}
{{- if include "crownstone-webhooks.servesApi" . }}
{{- $list = append $list (include "crownstone-webhooks.apiNamespace" .) }}
{{- end }}
{{- toJson (uniq $list) }}
{{- end }}

{{/* The Lease the replicas elect a leader with, in the release namespace. */}}
{{- define "crownstone-webhooks.leaseName" -}}
{{- include "crownstone-webhooks.fullname" . }}
{{- end }}

{{- define "crownstone-webhooks.adminSecretName" -}}
{{- .Values.adminKey.existingSecret | default (printf "%s-admin" (include "crownstone-webhooks.fullname" .)) }}
{{- end }}

{{- define "crownstone-webhooks.adminSecretKey" -}}
{{- if .Values.adminKey.existingSecret }}{{ .Values.adminKey.existingSecretKey }}{{ else }}adminKey{{ end }}
{{- end }}

{{/* What the controller reads and writes in a namespace it watches (or in all), Secret
writes aside: each verb is one the code uses. Listeners are deleted on expiry and with their
WebhookUser; finalizers and ownerReferences are patched; status is server-side applied; Events
are created and patched as kube's Recorder does. */}}
{{- define "crownstone-webhooks.operatorRules" -}}
- apiGroups: [webhooks.crownstone.rocks]
  resources: [listeners]
  verbs: [list, watch, patch, delete]
- apiGroups: [webhooks.crownstone.rocks]
  resources: [webhookusers]
  verbs: [list, watch, patch]
- apiGroups: [webhooks.crownstone.rocks]
  resources: [listeners/status, webhookusers/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* Secret writes of the controller: a WebhookUser's credentials Secret is created, patched
to record a changed client secret and prune expired previous ones, and deleted with the
WebhookUser, as is a managed token Secret no Listener reads any more. */}}
{{- define "crownstone-webhooks.secretWriteRules" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch, delete]
{{- end }}

{{/* What the REST API does in its namespace: users and listeners are created, patched and
deleted; token Secrets are created, rewritten (patch) and removed when a create is undone. */}}
{{- define "crownstone-webhooks.apiRules" -}}
- apiGroups: [webhooks.crownstone.rocks]
  resources: [webhookusers]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [webhooks.crownstone.rocks]
  resources: [listeners]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}

{{/* Whether replicas hand over through the progress transport: leader election and the
transport both on. */}}
{{- define "crownstone-webhooks.handover" -}}
{{- if and .Values.leaderElection.enabled .Values.handover.enabled }}true{{ end }}
{{- end }}

{{/* Refuses values that cannot work together: sharding moves tokens through the handover and
keeps the leader Lease for the cluster-wide writes; an autoscaler without sharding would only add
standbys, and one without a CPU request has nothing to measure against. */}}
{{- define "crownstone-webhooks.checkScaling" -}}
{{- if .Values.sharding.enabled }}
{{- if not .Values.leaderElection.enabled }}
{{- fail "sharding.enabled needs leaderElection.enabled: one elected replica still writes WebhookUsers, Secrets and finalizers, and the operator refuses to shard without it" }}
{{- end }}
{{- if not .Values.handover.enabled }}
{{- fail "sharding.enabled needs handover.enabled: a token moves between replicas through the handover, authenticated with its key (HANDOVER_KEY)" }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if not .Values.sharding.enabled }}
{{- fail "autoscaling.enabled needs sharding.enabled: without sharding only the leader streams and delivers, and more replicas would only be standbys" }}
{{- end }}
{{- if not (dig "requests" "cpu" "" (.Values.resources | default dict)) }}
{{- fail "autoscaling.enabled needs resources.requests.cpu: the autoscaler measures CPU use as a share of it" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "crownstone-webhooks.handoverSecretName" -}}
{{- .Values.handover.existingSecret | default (printf "%s-handover" (include "crownstone-webhooks.fullname" .)) }}
{{- end }}

{{- define "crownstone-webhooks.handoverSecretKey" -}}
{{- if .Values.handover.existingSecret }}{{ .Values.handover.existingSecretKey }}{{ else }}handoverKey{{ end }}
{{- end }}

{{/* A duration such as 1m30s or 500ms, in milliseconds. */}}
{{- define "crownstone-webhooks.durationMs" -}}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- if hasSuffix "ms" . }}{{ $total = add $total (trimSuffix "ms" . | atoi) }}
{{- else if hasSuffix "s" . }}{{ $total = add $total (mul (trimSuffix "s" . | atoi) 1000) }}
{{- else if hasSuffix "m" . }}{{ $total = add $total (mul (trimSuffix "m" . | atoi) 60000) }}
{{- else if hasSuffix "h" . }}{{ $total = add $total (mul (trimSuffix "h" . | atoi) 3600000) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/* Seconds Kubernetes waits after SIGTERM, unless set: the drain (shutdownGrace), the last
status writes (bounded by shutdownGrace as well), the wait for standbys to fetch the final
handover batch (2 s), and 3 s to hand the Lease back and exit; rounded up. */}}
{{- define "crownstone-webhooks.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $grace := include "crownstone-webhooks.durationMs" .Values.shutdownGrace | atoi }}
{{- $ms := add (mul $grace 2) 2000 3000 }}
{{- div (add $ms 999) 1000 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
