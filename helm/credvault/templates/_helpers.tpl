{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "credvault.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart name unless it already contains it. */}}
{{- define "credvault.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "credvault.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "credvault.labels" -}}
helm.sh/chart: {{ include "credvault.chart" . }}
{{ include "credvault.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "credvault.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credvault.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "credvault.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credvault.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Names of the Secrets the operator creates (or cert-manager writes). */}}
{{- define "credvault.keyringSecret" -}}
{{- default (printf "%s-keyring" (include "credvault.fullname" .)) .Values.keyring.existingSecret }}
{{- end }}
{{- define "credvault.passphraseSecret" -}}
{{- default (printf "%s-passphrase" (include "credvault.fullname" .)) .Values.passphrase.existingSecret }}
{{- end }}
{{- define "credvault.tlsSecret" -}}
{{- default (printf "%s-tls" (include "credvault.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The trust domain of SPIFFE IDs: config.auth.trust_domain, else cluster.local. */}}
{{- define "credvault.trustDomain" -}}
{{- default "cluster.local" .Values.config.auth.trust_domain }}
{{- end }}

{{- define "credvault.spiffeId" -}}
{{- if .Values.tls.certManager.uri }}
{{- .Values.tls.certManager.uri }}
{{- else }}
{{- printf "spiffe://%s/ns/%s/sa/%s" (include "credvault.trustDomain" .) .Release.Namespace (include "credvault.serviceAccountName" .) }}
{{- end }}
{{- end }}

{{/* Where things are mounted in the container. */}}
{{- define "credvault.paths" -}}
configDir: /etc/credvault
tlsDir: /var/run/secrets/credvault/tls
keyringDir: /var/run/secrets/credvault/keyring
passphraseDir: /var/run/secrets/credvault/passphrase
providersDir: /var/run/secrets/credvault/providers
dataMount: /var/lib/credvault
etcdTlsDir: /var/run/secrets/credvault/etcd
{{- end }}

{{/*
One TOML value from a Helm value: strings as (JSON-escaped, TOML-compatible)
basic strings, booleans as is, numbers as integers (Helm reads YAML numbers as
floats; credvault's numeric keys are all integers), lists as arrays.
*/}}
{{- define "credvault.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}{{ int64 . }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "credvault.tomlValue" $v }}{{ end }}]
{{- else }}{{ fail (printf "credvault.toml: cannot render %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* The keys of a section, sorted, as TOML lines. */}}
{{- define "credvault.tomlTable" -}}
{{- range $k := keys . | sortAlpha }}
{{ $k }} = {{ include "credvault.tomlValue" (get $ $k) }}
{{- end }}
{{- end }}

{{/* Seconds in a simple duration (N, Ns, Nm, Nh); -1 when it cannot tell. */}}
{{- define "credvault.durationSeconds" -}}
{{- $d := toString . | trim }}
{{- if regexMatch "^[0-9]+s?$" $d }}{{ trimSuffix "s" $d | int }}
{{- else if regexMatch "^[0-9]+m$" $d }}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if regexMatch "^[0-9]+h$" $d }}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else }}-1
{{- end }}
{{- end }}
