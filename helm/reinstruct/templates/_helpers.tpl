{{- define "reinstruct.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "reinstruct.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "reinstruct.authSecret" -}}
{{- default (printf "%s-ray-auth" (include "reinstruct.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{- define "reinstruct.apiSecret" -}}
{{- default (printf "%s-api-token" (include "reinstruct.fullname" .)) .Values.apiAuth.existingSecret -}}
{{- end -}}

{{/* REINSTRUCT_API_TOKEN for the replicas (they check it) and the loop driver (it presents it); the
request size limit for the replicas and for Serve's gRPC proxy, which then refuses a larger message
before reading it (1 MiB above the replicas' limit, which answers with the field to fix). */}}
{{- define "reinstruct.apiEnv" -}}
env:
{{- if .Values.apiAuth.enabled }}
  - name: REINSTRUCT_API_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "reinstruct.apiSecret" . }}
        key: api_token
{{- end }}
  - name: REINSTRUCT_MAX_REQUEST_BYTES
    value: {{ mul .Values.serve.maxRequestMiB 1048576 | quote }}
  - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
    value: {{ mul (add .Values.serve.maxRequestMiB 1) 1048576 | quote }}
{{- end -}}

{{- define "reinstruct.claim" -}}
{{- default (printf "%s-store" (include "reinstruct.fullname" .)) .Values.store.pvc.existingClaim -}}
{{- end -}}

{{- define "reinstruct.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Settings every app gets: the user's overrides plus where the store is and which ports serve. */}}
{{- define "reinstruct.settings" -}}
{{- $store := dict "store" (dict "root" .Values.store.root) -}}
{{- $serve := dict "serve" (dict "grpc_port" (int .Values.serve.grpcPort) "http_port" (int .Values.serve.httpPort)) -}}
{{- toJson (mustMergeOverwrite (dict) (deepCopy .Values.reinstruct) $store $serve) -}}
{{- end -}}

{{/* The Serve config (as `serve build` writes it) for the four apps. */}}
{{- define "reinstruct.serveConfig" -}}
{{- $settings := include "reinstruct.settings" . | fromJson -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.httpPort }}
grpc_options:
  port: {{ .Values.serve.grpcPort }}
  enable_reflection: true
  grpc_servicer_functions:
    - services.api.servicers.add_GeneratorServicer_to_server
    - services.api.servicers.add_FilterServicer_to_server
    - services.api.servicers.add_TrainerServicer_to_server
    - services.api.servicers.add_EvaluatorServicer_to_server
applications:
  - name: generator
    route_prefix: /generator
    import_path: services.generator.deployment:build_app
    args:
      settings: {{ toJson $settings }}
  - name: filter
    route_prefix: /filter
    import_path: services.filter.deployment:build_app
    args:
      settings: {{ toJson $settings }}
  - name: trainer
    route_prefix: /trainer
    import_path: services.trainer.deployment:build_app
    args:
      settings: {{ toJson $settings }}
  - name: evaluator
    route_prefix: /evaluator
    import_path: services.evaluator.deployment:build_app
    args:
      settings: {{ toJson $settings }}
{{- end -}}

{{- define "reinstruct.volumes" -}}
{{- if .Values.store.pvc.enabled }}
volumes:
  - name: store
    persistentVolumeClaim:
      claimName: {{ include "reinstruct.claim" . }}
{{- end }}
{{- end -}}

{{- define "reinstruct.volumeMounts" -}}
{{- if .Values.store.pvc.enabled }}
volumeMounts:
  - name: store
    mountPath: {{ .Values.store.mountPath }}
{{- end }}
{{- end -}}

{{/* The Ray cluster: head (exposes 9000 as serve-grpc, 8000 as serve), CPU and GPU worker groups. */}}
{{- /* Custom Ray resources that replicas (reinstruct.serve.<app>.resources) and training workers
(reinstruct.training.worker_resources) ask for must be advertised by an enabled worker group, or they
would wait forever for a node: the chart refuses to render instead. */ -}}
{{- define "reinstruct.checkPlacement" -}}
{{- $advertised := list -}}
{{- range $name, $amount := (.Values.cpuWorkers.rayResources | default dict) -}}
{{- if gt (float64 $amount) 0.0 }}{{ $advertised = append $advertised $name }}{{ end -}}
{{- end -}}
{{- if .Values.gpuWorkers.enabled -}}
{{- range $name, $amount := (.Values.gpuWorkers.rayResources | default dict) -}}
{{- if gt (float64 $amount) 0.0 }}{{ $advertised = append $advertised $name }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $serve := .Values.reinstruct.serve | default dict -}}
{{- range $app := list "generator" "filter" "trainer" "evaluator" -}}
{{- $section := index $serve $app | default dict -}}
{{- range $name, $_ := ($section.resources | default dict) -}}
{{- if not (has $name $advertised) -}}
{{- fail (printf "reinstruct.serve.%s.resources asks for Ray resource %q, which no enabled worker group advertises (cpuWorkers.rayResources, gpuWorkers.rayResources)" $app $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $training := .Values.reinstruct.training | default dict -}}
{{- range $name, $_ := ($training.worker_resources | default dict) -}}
{{- if not (has $name $advertised) -}}
{{- fail (printf "reinstruct.training.worker_resources asks for Ray resource %q, which no enabled worker group advertises (cpuWorkers.rayResources, gpuWorkers.rayResources)" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "reinstruct.rayCluster" -}}
{{- include "reinstruct.checkPlacement" . -}}
rayVersion: {{ .Values.rayVersion | quote }}
enableInTreeAutoscaling: true
{{- if .Values.rayAuth.enabled }}
authOptions:
  mode: token
  secretName: {{ include "reinstruct.authSecret" . }}
{{- end }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"
    dashboard-host: 0.0.0.0
  template:
    metadata:
      labels:
        {{- include "reinstruct.labels" . | nindent 8 }}
    spec:
      containers:
        - name: ray-head
          image: {{ include "reinstruct.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            - {containerPort: {{ .Values.serve.httpPort }}, name: serve}
            - {containerPort: {{ .Values.serve.grpcPort }}, name: serve-grpc}
          resources:
            {{- toYaml .Values.head.resources | nindent 12 }}
          {{- include "reinstruct.apiEnv" . | nindent 10 }}
          {{- include "reinstruct.volumeMounts" . | nindent 10 }}
      {{- include "reinstruct.volumes" . | nindent 6 }}
workerGroupSpecs:
  - groupName: cpu
    replicas: {{ .Values.cpuWorkers.replicas }}
    minReplicas: {{ .Values.cpuWorkers.minReplicas }}
    maxReplicas: {{ .Values.cpuWorkers.maxReplicas }}
    {{- if .Values.cpuWorkers.rayResources }}
    rayStartParams:
      resources: {{ toJson .Values.cpuWorkers.rayResources | quote | toJson }}
    {{- else }}
    rayStartParams: {}
    {{- end }}
    template:
      metadata:
        labels:
          {{- include "reinstruct.labels" . | nindent 10 }}
      spec:
        containers:
          - name: ray-worker
            image: {{ include "reinstruct.image" . }}
            imagePullPolicy: {{ .Values.image.pullPolicy }}
            resources:
              {{- toYaml .Values.cpuWorkers.resources | nindent 14 }}
            {{- include "reinstruct.apiEnv" . | nindent 12 }}
            {{- include "reinstruct.volumeMounts" . | nindent 12 }}
        {{- include "reinstruct.volumes" . | nindent 8 }}
{{- if .Values.gpuWorkers.enabled }}
  - groupName: gpu
    replicas: {{ .Values.gpuWorkers.replicas }}
    minReplicas: {{ .Values.gpuWorkers.minReplicas }}
    maxReplicas: {{ .Values.gpuWorkers.maxReplicas }}
    rayStartParams:
      num-gpus: {{ .Values.gpuWorkers.gpusPerWorker | quote }}
      {{- with .Values.gpuWorkers.rayResources }}
      resources: {{ toJson . | quote | toJson }}
      {{- end }}
    template:
      metadata:
        labels:
          {{- include "reinstruct.labels" . | nindent 10 }}
      spec:
        {{- with .Values.gpuWorkers.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .Values.gpuWorkers.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "reinstruct.image" . }}
            imagePullPolicy: {{ .Values.image.pullPolicy }}
            resources:
              requests:
                {{- toYaml .Values.gpuWorkers.resources.requests | nindent 16 }}
                nvidia.com/gpu: {{ .Values.gpuWorkers.gpusPerWorker }}
              limits:
                {{- toYaml .Values.gpuWorkers.resources.limits | nindent 16 }}
                nvidia.com/gpu: {{ .Values.gpuWorkers.gpusPerWorker }}
            {{- include "reinstruct.apiEnv" . | nindent 12 }}
            {{- include "reinstruct.volumeMounts" . | nindent 12 }}
        {{- include "reinstruct.volumes" . | nindent 8 }}
{{- end }}
{{- end -}}
