{{/*
Names. Every object is <release>-shoal-<component> unless the release name already holds "shoal".
*/}}
{{- define "shoal.fullname" -}}
{{- if contains "shoal" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-shoal" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.operator.fullname" -}}{{ include "shoal.fullname" . }}-operator{{- end -}}
{{- define "shoal.gateway.fullname" -}}{{ include "shoal.fullname" . }}-gateway{{- end -}}

{{- define "shoal.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "shoal.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Labels: the recommended app.kubernetes.io set, the component, and global.labels.
Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.labels" -}}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: shoal
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- with .ctx.Values.global.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The image reference: [registry/]repository(@digest|:tag).
*/}}
{{- define "shoal.image" -}}
{{- $repo := .Values.image.repository -}}
{{- with .Values.global.imageRegistry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "shoal.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The bundled NATS server's Service name: the nats chart's own "nats.fullname" rule, evaluated with
the subchart's values.
*/}}
{{- define "shoal.nats.serviceName" -}}
{{- $n := .Values.nats -}}
{{- if $n.fullnameOverride -}}
{{- $n.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "nats" $n.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The NATS URL every Shoal process uses: the bundled server by its namespace-qualified Service name
(function hosts run in the FederatedJobs' namespaces), or nats.url.
*/}}
{{- define "shoal.nats.url" -}}
{{- if .Values.nats.enabled -}}
{{- $port := 4222 -}}
{{- with .Values.nats.config -}}{{- with .nats -}}{{- with .port -}}{{- $port = . -}}{{- end -}}{{- end -}}{{- end -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "tls" "nats" .Values.nats.tls.enabled) (include "shoal.nats.serviceName" .) .Release.Namespace $port -}}
{{- else -}}
{{- required "nats.url is required when nats.enabled is false (e.g. nats://nats.example:4222)" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/*
The Secret with the Shoal processes' NATS credentials ("" when nats.auth.mode is none).
*/}}
{{- define "shoal.nats.authSecret" -}}
{{- if ne .Values.nats.auth.mode "none" -}}
{{- default (printf "%s-nats-auth" (include "shoal.fullname" .)) .Values.nats.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "shoal.nats.caSecret" -}}
{{- if .Values.nats.tls.ca.secretName -}}
{{- .Values.nats.tls.ca.secretName -}}
{{- else if .Values.nats.tls.certManager.enabled -}}
{{- .Values.nats.tls.certManager.secretName -}}
{{- end -}}
{{- end -}}

{{/*
Environment of a Shoal process that connects to NATS: the URL, the prefix, the credentials (as the
`shoal` and `shoal-operator` commands read them) and TLS. Files are mounted by
"shoal.nats.volumeMounts" under /etc/shoal.
*/}}
{{- define "shoal.nats.env" -}}
- name: SHOAL_NATS_URL
  value: {{ include "shoal.nats.url" . | quote }}
- name: SHOAL_PREFIX
  value: {{ .Values.nats.prefix | quote }}
{{- $secret := include "shoal.nats.authSecret" . }}
{{- $mode := .Values.nats.auth.mode }}
{{- if eq $mode "nkey" }}
- name: SHOAL_NATS_NKEY
  value: /etc/shoal/nats-auth/nkey
{{- else if eq $mode "creds" }}
- name: SHOAL_NATS_CREDS
  value: /etc/shoal/nats-auth/creds
{{- else if eq $mode "userPassword" }}
- name: SHOAL_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: SHOAL_NATS_USER
- name: SHOAL_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: SHOAL_NATS_PASSWORD
{{- else if eq $mode "token" }}
- name: SHOAL_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: SHOAL_NATS_TOKEN
{{- end }}
{{- if .Values.nats.tls.enabled }}
{{- if include "shoal.nats.caSecret" . }}
- name: SHOAL_NATS_CA
  value: /etc/shoal/nats-ca/{{ .Values.nats.tls.ca.key }}
{{- end }}
{{- if .Values.nats.tls.clientCertSecret }}
- name: SHOAL_NATS_CERT
  value: /etc/shoal/nats-client/tls.crt
- name: SHOAL_NATS_KEY
  value: /etc/shoal/nats-client/tls.key
{{- end }}
{{- if .Values.nats.tls.requireTls }}
- name: SHOAL_NATS_REQUIRE_TLS
  value: "true"
{{- end }}
{{- end }}
{{- end -}}

{{- define "shoal.nats.volumeMounts" -}}
{{- if has .Values.nats.auth.mode (list "nkey" "creds") }}
- name: nats-auth
  mountPath: /etc/shoal/nats-auth
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.enabled }}
{{- if include "shoal.nats.caSecret" . }}
- name: nats-ca
  mountPath: /etc/shoal/nats-ca
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.clientCertSecret }}
- name: nats-client
  mountPath: /etc/shoal/nats-client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "shoal.nats.volumes" -}}
{{- $mode := .Values.nats.auth.mode }}
{{- if has $mode (list "nkey" "creds") }}
- name: nats-auth
  secret:
    secretName: {{ include "shoal.nats.authSecret" . | quote }}
    defaultMode: 0400
    items:
      - key: {{ $mode }}
        path: {{ $mode }}
{{- end }}
{{- if .Values.nats.tls.enabled }}
{{- with include "shoal.nats.caSecret" . }}
- name: nats-ca
  secret:
    secretName: {{ . | quote }}
    defaultMode: 0444
    items:
      - key: {{ $.Values.nats.tls.ca.key }}
        path: {{ $.Values.nats.tls.ca.key }}
{{- end }}
{{- with .Values.nats.tls.clientCertSecret }}
- name: nats-client
  secret:
    secretName: {{ . | quote }}
    defaultMode: 0400
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/*
The restricted security context of every Shoal container (Pod Security "restricted" fields).
*/}}
{{- define "shoal.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shoal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Checks across values that the schema cannot express. Included by every template that depends on
them, so `helm template` fails with the reason.
*/}}
{{- define "shoal.validate" -}}
{{- $v := .Values -}}
{{- if and (gt (int $v.operator.replicas) 1) (not $v.operator.leaderElection) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection: true (two leaders would fight over every FederatedJob)" -}}
{{- end -}}
{{- if and $v.nats.enabled $v.nats.url -}}
{{- fail "set nats.url only with nats.enabled: false (the bundled server's URL is derived from its Service)" -}}
{{- end -}}
{{- if and $v.nats.enabled $v.nats.tls.enabled -}}
{{- $servertls := dict -}}
{{- with $v.nats.config -}}{{- with .nats -}}{{- with .tls -}}{{- $servertls = . -}}{{- end -}}{{- end -}}{{- end -}}
{{- if not $servertls.enabled -}}
{{- fail "nats.tls.enabled with the bundled NATS needs its server TLS too: nats.config.nats.tls.enabled: true and nats.config.nats.tls.secretName" -}}
{{- end -}}
{{- if and $v.nats.tls.certManager.enabled (ne (toString $servertls.secretName) $v.nats.tls.certManager.secretName) -}}
{{- fail (printf "nats.config.nats.tls.secretName (%v) must be nats.tls.certManager.secretName (%s), the Secret cert-manager writes" $servertls.secretName $v.nats.tls.certManager.secretName) -}}
{{- end -}}
{{- end -}}
{{- if and $v.nats.tls.certManager.enabled (not $v.nats.enabled) -}}
{{- fail "nats.tls.certManager issues the bundled NATS server's certificate: it needs nats.enabled (for an external server, give its CA in nats.tls.ca)" -}}
{{- end -}}
{{- if and $v.nats.tls.certManager.enabled (not $v.nats.tls.certManager.issuerRef.name) -}}
{{- fail "nats.tls.certManager.issuerRef.name is required (an Issuer or ClusterIssuer of cert-manager)" -}}
{{- end -}}
{{- if and $v.nats.tls.enabled (not $v.nats.enabled) (hasPrefix "nats://" $v.nats.url) -}}
{{- fail "nats.tls.enabled with an external server needs a tls:// nats.url" -}}
{{- end -}}
{{- $mode := $v.nats.auth.mode -}}
{{- if and (ne $mode "none") (not $v.nats.auth.existingSecret) -}}
{{- $need := dict "nkey" (list $v.nats.auth.nkeySeed) "creds" (list $v.nats.auth.creds) "userPassword" (list $v.nats.auth.user $v.nats.auth.password) "token" (list $v.nats.auth.token) -}}
{{- range (get $need $mode) -}}
{{- if not . -}}
{{- fail (printf "nats.auth.mode %s needs nats.auth.existingSecret or its values (nkeySeed, creds, user + password, token)" $mode) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq $v.gateway.mode "split" -}}
{{- if has $mode (list "nkey" "creds") -}}
{{- fail (printf "gateway.mode split: function hosts take NATS credentials only from the Secret keys SHOAL_NATS_USER/PASSWORD/TOKEN (the operator's contract), not nats.auth.mode %s" $mode) -}}
{{- end -}}
{{- if and $v.nats.tls.enabled (include "shoal.nats.caSecret" .) -}}
{{- fail "gateway.mode split: the function hosts the operator stamps cannot mount a private NATS CA yet (the operator's contract has no CA); use a publicly trusted certificate or gateway.mode node" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
ebpf.mode as text: an unquoted `off` in a values file is YAML 1.1's false.
*/}}
{{- define "shoal.ebpf.mode" -}}
{{- $m := toString .Values.ebpf.mode -}}
{{- ternary "off" $m (eq $m "false") -}}
{{- end -}}
