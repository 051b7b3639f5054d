{{/*
Names and labels.
*/}}
{{- define "tierproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tierproxy.fullname" -}}
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

{{- define "tierproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tierproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tierproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tierproxy.labels" -}}
helm.sh/chart: {{ include "tierproxy.chart" . }}
{{ include "tierproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tierproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The label that marks a pod as running this release's sidecar: the metrics Service and
the PodMonitor select on it, so they also find a workload of your own that includes the
sidecar (whose app.kubernetes.io/name is its own). */}}
{{- define "tierproxy.sidecarSelector" -}}
tierproxy/sidecar: {{ include "tierproxy.fullname" . }}
{{- end }}

{{/*
Secrets. The URLs (they may carry passwords) and the API token reach the sidecar as
TIERPROXY_* env vars from a Secret: the chart's own for inline values, or an existingSecret.
Redis has its own templates (_redis.tpl): its URL may also be built from parts.
*/}}
{{- define "tierproxy.secretName" -}}
{{- include "tierproxy.fullname" . }}
{{- end }}

{{/* The other secrets: value (.Values.<section>.<field>), env var, key in the chart's Secret. */}}
{{- define "tierproxy.secretSpecs" -}}
- {section: postgres, field: url, env: TIERPROXY_POSTGRES_URL, key: postgres-url}
- {section: clickhouse, field: url, env: TIERPROXY_CLICKHOUSE_URL, key: clickhouse-url}
- {section: api, field: token, env: TIERPROXY_API_TOKEN, key: api-token}
{{- end }}

{{/* The chart's Secret, as key: plain value (YAML; empty: no Secret). Only values given
inline; those with an existingSecret are read from it instead. */}}
{{- define "tierproxy.secretData" -}}
{{- with include "tierproxy.redisSecretUrl" . }}
redis-url: {{ . | quote }}
{{- end }}
{{- range include "tierproxy.secretSpecs" . | fromYamlArray }}
{{- $v := index $.Values .section }}
{{- if and (index $v .field) (not $v.existingSecret) }}
{{ .key }}: {{ index $v .field | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* env entries (secretKeyRef) of every secret the sidecar reads; the token only when set. */}}
{{- define "tierproxy.secretEnv" -}}
{{- include "tierproxy.redisEnv" . }}
{{- range include "tierproxy.secretSpecs" . | fromYamlArray }}
{{- $v := index $.Values .section }}
{{- if or $v.existingSecret (index $v .field) }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.existingSecret | default (include "tierproxy.secretName" $) }}
      key: {{ ternary $v.existingSecretKey .key (not (empty $v.existingSecret)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tierproxy.tokenEnv" -}}
{{- $v := .Values.api }}
{{- if or $v.existingSecret $v.token }}
- name: TIERPROXY_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.existingSecret | default (include "tierproxy.secretName" .) }}
      key: {{ ternary $v.existingSecretKey "api-token" (not (empty $v.existingSecret)) }}
{{- end }}
{{- end }}

{{/*
Validation of everything the sidecar needs, run by configmap.yaml (rendered in every mode)
and again by each named template a workload includes. Every failure names the value to fix.
*/}}
{{- define "tierproxy.validate" -}}
{{- include "tierproxy.validateRedis" . }}
{{- $schemes := dict "postgres" (list "postgres://" "postgresql://") "clickhouse" (list "http://" "https://") }}
{{- $missing := list }}
{{- if not (include "tierproxy.redisSource" .) }}
{{- $missing = append $missing "redis.url (or redis.existingSecret, or the parts redis.host, redis.sentinel.hosts or redis.cluster.nodes)" }}
{{- end }}
{{- range $section := list "postgres" "clickhouse" }}
{{- $v := index $.Values $section }}
{{- if and $v.url $v.existingSecret }}
{{- fail (printf "tierproxy: set %s.url or %s.existingSecret, not both" $section $section) }}
{{- end }}
{{- if not (or $v.url $v.existingSecret) }}
{{- $missing = append $missing (printf "%s.url (or %s.existingSecret)" $section $section) }}
{{- else if $v.url }}
{{- $ok := false }}
{{- range $prefix := index $schemes $section }}
{{- if hasPrefix $prefix $v.url }}{{ $ok = true }}{{ end }}
{{- end }}
{{- if not $ok }}
{{- fail (printf "tierproxy: %s.url must start with one of %s (an external server; embedded servers are for development only)" $section (index $schemes $section | join ", ")) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "tierproxy: missing required value: %s. Give the URL of an external server: the sidecar's embedded servers are for development only" (join ", " $missing)) }}
{{- end }}
{{- if and .Values.api.token .Values.api.existingSecret }}
{{- fail "tierproxy: set api.token or api.existingSecret, not both" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "tierproxy: metrics.serviceMonitor.enabled needs metrics.service.enabled (it selects that Service)" }}
{{- end }}
{{- if and .Values.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "tierproxy: sidecar.native needs Kubernetes 1.29 or newer (an init container with restartPolicy: Always), this cluster is %s: set sidecar.native=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- include "tierproxy.validateGracePeriod" . }}
{{- end }}

{{/* Checks of the example Deployment only (not of a workload that includes the sidecar). */}}
{{- define "tierproxy.validateDeployment" -}}
{{- if and .Values.app.enabled (not .Values.app.image.repository) }}
{{- fail "tierproxy: app.image.repository is required while app.enabled is true (the backend image the sidecar runs beside)" }}
{{- end }}
{{- if and .Values.sidecar.native (not .Values.app.enabled) }}
{{- fail "tierproxy: sidecar.native needs app.enabled: a pod needs at least one regular container" }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (not (eq (toString .minAvailable) "")) (not (eq (toString .maxUnavailable) "")) }}
{{- fail "tierproxy: set podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable, not both (empty one of them)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The sidecar's shutdown deadline: config.shutdown.deadline_s, or the env var overriding it
in sidecar.env, or tierproxy's default. */}}
{{- define "tierproxy.shutdownDeadline" -}}
{{- $deadline := 10.0 }}
{{- with .Values.config }}{{ with .shutdown }}{{ if hasKey . "deadline_s" }}{{ $deadline = float64 .deadline_s }}{{ end }}{{ end }}{{ end }}
{{- range .Values.sidecar.env }}
{{- if and (eq .name "TIERPROXY_SHUTDOWN_DEADLINE_S") (hasKey . "value") }}{{ $deadline = float64 .value }}{{ end }}
{{- end }}
{{- $deadline }}
{{- end }}

{{/* terminationGracePeriodSeconds must leave the sidecar its whole deadline. Native: the
kubelet sends it SIGTERM only after the app has exited, so the app's time comes first. */}}
{{- define "tierproxy.validateGracePeriod" -}}
{{- $grace := float64 .Values.terminationGracePeriodSeconds }}
{{- $deadline := include "tierproxy.shutdownDeadline" . | float64 }}
{{- $app := float64 .Values.app.shutdownSeconds }}
{{- if .Values.sidecar.native }}
{{- if le $grace (addf $app $deadline) }}
{{- fail (printf "tierproxy: terminationGracePeriodSeconds (%v) must exceed app.shutdownSeconds (%v) + the sidecar's config.shutdown.deadline_s (%v) = %v: a native sidecar gets SIGTERM only after the app has exited, and the kubelet would kill it before its final flush" $grace $app $deadline (addf $app $deadline)) }}
{{- end }}
{{- else if le $grace (maxf $app $deadline) }}
{{- fail (printf "tierproxy: terminationGracePeriodSeconds (%v) must exceed both app.shutdownSeconds (%v) and the sidecar's config.shutdown.deadline_s (%v), or the kubelet kills the sidecar before its final flush" $grace $app $deadline) }}
{{- end }}
{{- end }}

{{/*
config.toml. Every tierproxy setting with its type; must match proxy/settings.py (a test
checks it). Values of .Values.config are rendered by type, because Helm turns every number
into a float64 (1048576 would otherwise print as 1.048576e+06).
*/}}
{{- define "tierproxy.configKeys" -}}
api: {host: str, port: int, token: str, max_body_bytes: int, max_content_chars: int, max_metadata_bytes: int, request_timeout_s: float}
metrics: {host: str, port: int}
data: {dir: str}
redis: {url: str, shards: int, window: int, pool_size: int, socket_timeout_s: float, health_check_interval_s: float, ack_replicas: int, ack_timeout_ms: int, max_memory_ratio: float, write_through: bool}
postgres: {url: str, pool_max: int, command_timeout_s: float}
clickhouse: {url: str, max_batch: int, interval_ms: int, store_content: bool, retention_days: int}
flush: {max_batch: int, max_delay_ms: int, max_inflight: int, max_attempts: int, claim_idle_ms: int, backoff_base_ms: int, backoff_max_ms: int, max_backlog: int, trim_interval_s: float, max_lag_s: float, sinks: str}
circuit: {failure_threshold: int, open_s: float}
cache: {ttl_s: int, recent_ids: int, id_clock_skew_s: float}
ws: {queue_size: int, max_subscriptions: int}
worker: {socket: str}
shutdown: {deadline_s: float}
log: {level: str, format: str}
debug: {failpoint: str}
ephemeral: {max_event_bytes: int, rate_per_s: float, burst: int}
{{- end }}

{{/* Keys that have their own value (flags or Secret) and so are refused in .Values.config. */}}
{{- define "tierproxy.reservedKeys" -}}
api.host: nothing (the API always listens on 127.0.0.1, set on the command line)
api.port: sidecar.apiPort
api.token: api.token or api.existingSecret (a Secret)
metrics.host: nothing (the metrics server must listen on 0.0.0.0 for probes and scraping)
metrics.port: sidecar.metricsPort
redis.url: redis.url, redis.existingSecret or the redis parts (host, sentinel, cluster)
postgres.url: postgres.url or postgres.existingSecret (a Secret)
clickhouse.url: clickhouse.url or clickhouse.existingSecret (a Secret)
{{- end }}

{{/* One TOML value. Input: dict key (section.name), type (str|int|float|bool), value. */}}
{{- define "tierproxy.tomlValue" -}}
{{- $v := .value }}
{{- $num := or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- if eq .type "str" }}
{{- if not (kindIs "string" $v) }}
{{- fail (printf "tierproxy: config.%s must be a string, got %v" .key $v) }}
{{- end }}
{{- toJson $v }}
{{- else if eq .type "bool" }}
{{- if not (kindIs "bool" $v) }}
{{- fail (printf "tierproxy: config.%s must be true or false, got %v" .key $v) }}
{{- end }}
{{- $v }}
{{- else if eq .type "int" }}
{{- if not (or (and $num (eq (float64 $v) (floor $v))) (and (kindIs "string" $v) (regexMatch "^-?[0-9]+$" (toString $v)))) }}
{{- fail (printf "tierproxy: config.%s must be a whole number, got %v" .key $v) }}
{{- end }}
{{- int64 $v }}
{{- else }}
{{- if not (or $num (and (kindIs "string" $v) (regexMatch "^-?[0-9]+(\\.[0-9]+)?$" (toString $v)))) }}
{{- fail (printf "tierproxy: config.%s must be a number, got %v" .key $v) }}
{{- end }}
{{- $s := toJson (float64 $v) }}
{{- if regexMatch "[.eE]" $s }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- end }}
{{- end }}

{{- define "tierproxy.configToml" -}}
{{- $known := include "tierproxy.configKeys" . | fromYaml }}
{{- $reserved := include "tierproxy.reservedKeys" . | fromYaml -}}
# Rendered by the tierproxy Helm chart from .Values.config. Keys left out keep tierproxy's
# defaults; TIERPROXY_<SECTION>_<KEY> env vars (the URLs and the token) override this file.
{{- range $section, $keys := .Values.config }}
{{- if not (hasKey $known $section) }}
{{- fail (printf "tierproxy: config.%s: unknown config section (known: %s)" $section (keys $known | sortAlpha | join ", ")) }}
{{- end }}
{{- if and $keys (not (kindIs "map" $keys)) }}
{{- fail (printf "tierproxy: config.%s must be a map of key: value" $section) }}
{{- end }}
{{- $types := index $known $section }}
{{- if $keys }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{- $path := printf "%s.%s" $section $key }}
{{- if not (hasKey $types $key) }}
{{- fail (printf "tierproxy: config.%s: unknown config key (known in [%s]: %s)" $path $section (keys $types | sortAlpha | join ", ")) }}
{{- end }}
{{- if hasKey $reserved $path }}
{{- fail (printf "tierproxy: config.%s cannot be set in config; use %s" $path (index $reserved $path)) }}
{{- end }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "tierproxy.tomlValue" (dict "key" $path "type" (index $types $key) "value" $value) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
