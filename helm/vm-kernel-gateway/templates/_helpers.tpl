{{/* Names, labels and the pieces both workloads share. */}}
{{- define "vmkg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmkg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmkg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vmkg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "router") */}}
{{- define "vmkg.selector" -}}
app.kubernetes.io/name: {{ include "vmkg.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vmkg.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "vmkg.authSecret" -}}
{{- default (printf "%s-auth" (include "vmkg.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "vmkg.usersSecret" -}}
{{- default (printf "%s-users" (include "vmkg.fullname" .)) .Values.users.existingSecret -}}
{{- end -}}

{{- define "vmkg.usersEnabled" -}}
{{- if or .Values.users.existingSecret .Values.users.entries -}}true{{- end -}}
{{- end -}}

{{- define "vmkg.storeSecret" -}}
{{- default (printf "%s-store" (include "vmkg.fullname" .)) .Values.store.existingSecret -}}
{{- end -}}

{{- define "vmkg.storeCredentials" -}}
{{- if or .Values.store.existingSecret .Values.store.accessKeyId -}}true{{- end -}}
{{- end -}}

{{/* the headless Service the routers find the hosts through */}}
{{- define "vmkg.hostsService" -}}
{{- printf "%s-hosts" (include "vmkg.fullname" .) -}}
{{- end -}}

{{/* environment of both the router and the hosts */}}
{{- define "vmkg.env" -}}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: VMKG_IP
  value: "0.0.0.0"
- name: VMKG_JSON_LOGS
  value: "true"
- name: VMKG_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "vmkg.authSecret" . }}, key: token}
- name: VMKG_ROUTER_SECRET
  valueFrom:
    secretKeyRef: {name: {{ include "vmkg.authSecret" . }}, key: router-secret}
{{- if include "vmkg.usersEnabled" . }}
- name: VMKG_USERS_FILE
  value: /etc/vmkg/users/users.json
{{- end }}
{{- end -}}

{{/* the securityContext of a container that needs no privilege at all */}}
{{- define "vmkg.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
