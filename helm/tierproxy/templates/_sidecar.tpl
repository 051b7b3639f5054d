{{/*
The sidecar as named templates, for the chart's own Deployment and for a workload of yours.
Each takes the chart's context: `.` here, `.Subcharts.tierproxy` from a parent chart that
depends on this one (helm/examples/chat-backend shows a whole Deployment):

  metadata:
    labels:
      {{- include "tierproxy.sidecar.podLabels" .Subcharts.tierproxy | nindent 8 }}
    annotations:
      {{- include "tierproxy.sidecar.podAnnotations" .Subcharts.tierproxy | nindent 8 }}
  spec:
    {{- include "tierproxy.sidecar.podSpec" .Subcharts.tierproxy | nindent 6 }}
    {{- if .Values.tierproxy.sidecar.native }}
    initContainers:
      {{- include "tierproxy.sidecar" .Subcharts.tierproxy | nindent 8 }}
    {{- end }}
    containers:
      - name: app
        env:
          {{- include "tierproxy.sidecar.appEnv" .Subcharts.tierproxy | nindent 12 }}
      {{- if not .Values.tierproxy.sidecar.native }}
      {{- include "tierproxy.sidecar" .Subcharts.tierproxy | nindent 8 }}
      {{- end }}
    volumes:
      {{- include "tierproxy.sidecar.volumes" .Subcharts.tierproxy | nindent 8 }}

The ConfigMap and Secret they refer to are rendered by this chart (deployment.enabled: false
keeps its example Deployment out).
*/}}

{{/* The tierproxy container, one list item: under initContainers (sidecar.native, with
restartPolicy: Always) or under containers. */}}
{{- define "tierproxy.sidecar" -}}
{{- include "tierproxy.validate" . }}
{{- $metricsPort := int .Values.sidecar.metricsPort -}}
- name: tierproxy
  image: {{ include "tierproxy.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  # Native sidecar: started (startup probe passed) before the app, stopped after it.
  restartPolicy: Always
  {{- end }}
  command:
    - tierproxy
    - serve
    - --host
    - 127.0.0.1
    - --port
    - {{ int .Values.sidecar.apiPort | quote }}
    - --metrics-port
    - {{ $metricsPort | quote }}
    - --workers
    - {{ .Values.sidecar.workers | toString | quote }}
    - --config
    - /etc/tierproxy/config.toml
  ports:
    # The API (127.0.0.1) is deliberately not declared: nothing outside the pod may use it.
    - name: metrics
      containerPort: {{ $metricsPort }}
      protocol: TCP
  env:
    {{- include "tierproxy.secretEnv" . | trim | nindent 4 }}
    {{- with .Values.sidecar.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Probes use the metrics port: the API listens on 127.0.0.1, which the kubelet cannot reach.
  startupProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml .Values.sidecar.startupProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml .Values.sidecar.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml .Values.sidecar.livenessProbe | nindent 4 }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: tierproxy-config
      mountPath: /etc/tierproxy
      readOnly: true
    # The root filesystem is read-only; Python and tierproxy get a writable /tmp.
    - name: tierproxy-tmp
      mountPath: /tmp
    {{- with include "tierproxy.redisTlsMount" . }}
    {{- . | trim | nindent 4 }}
    {{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The pod volumes the sidecar mounts (list items). */}}
{{- define "tierproxy.sidecar.volumes" -}}
- name: tierproxy-config
  configMap:
    name: {{ include "tierproxy.fullname" . }}
- name: tierproxy-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- include "tierproxy.redisTlsVolume" . }}
{{- with .Values.sidecar.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod spec fields the sidecar needs. No service links: a Service named e.g.
"tierproxy-metrics" would inject TIERPROXY_METRICS_PORT=tcp://..., which tierproxy reads as
its metrics.port setting. The grace period is checked against the shutdown deadline. */}}
{{- define "tierproxy.sidecar.podSpec" -}}
{{- include "tierproxy.validate" . -}}
enableServiceLinks: false
terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
{{- end }}

{{/* Pod labels: the one the metrics Service and PodMonitor select. */}}
{{- define "tierproxy.sidecar.podLabels" -}}
{{ include "tierproxy.sidecarSelector" . }}
{{- end }}

{{/* Pod annotations: roll the pods when the config or the chart's Secret changes; the
Prometheus scrape annotations unless metrics.podAnnotations is off. */}}
{{- define "tierproxy.sidecar.podAnnotations" -}}
checksum/tierproxy-config: {{ include "tierproxy.configToml" . | sha256sum }}
checksum/tierproxy-secret: {{ include "tierproxy.secretData" . | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int .Values.sidecar.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* env of the app container: the sidecar's URL and the API token (list items). */}}
{{- define "tierproxy.sidecar.appEnv" -}}
{{- include "tierproxy.appEnvItems" . | trim }}
{{- end }}

{{- define "tierproxy.appEnvItems" -}}
{{- with .Values.app.sidecarUrlEnv }}
- name: {{ . }}
  value: {{ printf "http://127.0.0.1:%d" (int $.Values.sidecar.apiPort) | quote }}
{{- end }}
{{- include "tierproxy.tokenEnv" . }}
{{- end }}
