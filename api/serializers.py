from rest_framework import serializers

from inference.models import RequestLog


class RequestLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = RequestLog
        exclude = ["id"]


class UsageSerializer(serializers.Serializer):
    day = serializers.DateField()
    api_key = serializers.CharField(source="api_key_prefix")
    model = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
